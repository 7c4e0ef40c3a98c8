import httpx

from tests.support import Server


def test_health(server: Server) -> None:
    r = httpx.get(server.url + "/healthz")
    assert r.status_code == 200
    assert r.json()["status"] == "ok"
