"""postgrest-py against /datasets, created as its README shows, run by the version under
test (the project's pinned one, or the newest from a virtualenv of its own): prints what
each call returned, as JSON, for tests/test_postgrest_clients.py to compare with SQL.

    python postgrest_py.py BASE_URL TOKEN auth|headers
"""

from __future__ import annotations

import json
import sys
from typing import Any

from postgrest import APIError, SyncPostgrestClient
from postgrest.types import CountMethod


def main(base_url: str, token: str, style: str) -> None:
    if style == "auth":
        client = SyncPostgrestClient(base_url)
        client.auth(token)
    else:
        # Headers passed whole replace the client's defaults: no Accept is sent, so the
        # server hears httpx's `*/*`.
        client = SyncPostgrestClient(base_url, headers={"Authorization": f"Bearer {token}"})
    out: dict[str, Any] = {}
    with client:
        orders = client.from_("orders")
        out["select"] = orders.select("id", "customer", "amount").lt("id", 6).execute().data
        out["eq"] = client.from_("orders").select("*").eq("id", 7).execute().data
        out["or"] = (client.from_("orders").select("id").or_("id.eq.5,id.gt.19998")
                     .order("id").execute().data)
        out["order"] = (client.from_("orders").select("id,amount").lt("id", 20)
                        .order("amount", desc=True).order("id").execute().data)
        page = (client.from_("orders").select("id", count=CountMethod.exact).gte("id", 1000)
                .order("id").range(10, 19).execute())
        out["range"] = {"data": page.data, "count": page.count}
        try:
            client.from_("orders").select("id").eq("id", "not-a-number").execute()
            out["error"] = None
        except APIError as error:
            out["error"] = {"message": error.message, "code": error.code,
                            "details": error.details, "hint": error.hint}
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:4])
