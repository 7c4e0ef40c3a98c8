"""Helpers for what the routes read by hand from the request, declared for the OpenAPI
schema (each feature's `openapi.py` holds its declarations).

The routes take the Request and parse the query string and headers themselves (the
filter grammar has open-ended names), so FastAPI cannot see those inputs. Declaring
them changes no behaviour: it documents the API and lets a schema-driven fuzzer
(tests/test_fuzz_api.py) reach the parsers behind them.
"""

from __future__ import annotations

from typing import Any


def query(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema or {"type": "string"}}


def header(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "description": description,
            "schema": {"type": "string"}}
