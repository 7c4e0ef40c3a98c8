"""Behind a reverse proxy: EXPORTER_ROOT_PATH, sign-in behind TLS termination,
EXPORTER_FILES_ACCEL_REDIRECT, and docs/deploy.md's nginx configuration run for real
(nginx with a self-signed certificate in front of two exporter processes, driven by curl
and wget)."""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import signal
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from exporter.files.demo import LARGE_NAME, UNICODE_NAME
from tests.support import (
    ROOT,
    Server,
    audited,
    exporter_cli,
    fetch,
    free_port,
    sha256,
    wait_until,
)
from tests.test_access import CLOSED, bearer, new_token

PREFIX = "/exporter"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@pytest.fixture(scope="module")
def token(database_url: str) -> str:
    return new_token(database_url, f"proxy-{uuid.uuid4().hex[:6]}", "datasets:*", "files:*")


@pytest.fixture(scope="module")
def prefixed(make_module_server: type[Server]) -> Server:
    """One exporter with the prefix, believing X-Forwarded-* from loopback (as from nginx),
    shared by the module's tests: they only ask it things."""
    return make_module_server({**CLOSED, "EXPORTER_ROOT_PATH": PREFIX + "/",
                        "EXPORTER_FORWARDED_ALLOW_IPS": "127.0.0.1"}).start()


# --- EXPORTER_ROOT_PATH, straight against the app -------------------------------------------

@pytest.mark.parametrize("strip", [False, True], ids=["prefix-passed-on", "prefix-stripped"])
def test_root_path_is_in_every_url_whether_the_proxy_strips_it_or_not(
    prefixed: Server, token: str, strip: bool,
) -> None:
    at = prefixed.url + ("" if strip else PREFIX)
    base = prefixed.url + PREFIX
    auth = bearer(token)

    catalog = httpx.get(at + "/datasets", headers=auth)
    assert catalog.status_code == 200
    orders = next(d for d in catalog.json()["datasets"] if d["name"] == "orders")
    assert orders["exports"]["csv"] == f"{base}/datasets/orders.csv"
    listing = httpx.get(at + "/files/", headers=auth).json()
    urls = {e["name"]: e["url"] for e in listing["entries"]}
    assert urls["README.txt"] == f"{base}/files/README.txt"
    assert urls["nested"] == f"{base}/files/nested/"

    folder = httpx.get(at + "/files/nested", headers=auth)
    assert folder.status_code == 301 and folder.headers["location"] == f"{PREFIX}/files/nested/"
    slash = httpx.get(at + "/datasets/", headers=auth)
    assert slash.status_code == 307 and slash.headers["location"] == f"{base}/datasets"

    csv = httpx.get(at + "/datasets/orders.csv?limit=2&order=id", headers=auth)
    assert csv.status_code == 200 and csv.text.count("\n") == 3
    readme = httpx.get(at + "/files/README.txt", headers=auth)
    assert readme.content == b"Demo files served by exporter.\n"

    page = httpx.get(at + "/", headers=auth)
    assert page.status_code == 200
    html = page.text
    for expected in (f'action="{PREFIX}/session/end"', f'href="{PREFIX}/?path=nested/#files"',
                     f'href="{base}/datasets/orders.csv"', f'href="{PREFIX}/datasets"',
                     f'href="{base}/files/README.txt"'):
        assert expected in html, expected
    # No link of the page leaves the prefix.
    assert not re.search(r'(?:href|action)="/(?!exporter/)', html)


def test_the_bare_prefix_redirects_to_its_folder(prefixed: Server) -> None:
    r = httpx.get(prefixed.url + PREFIX + "?path=nested/")
    assert r.status_code == 301 and r.headers["location"] == f"{PREFIX}/?path=nested/"


@pytest.mark.parametrize("made_at", ["", PREFIX], ids=["made-stripped", "made-with-prefix"])
def test_signed_link_under_root_path_verifies_with_or_without_the_prefix(
    prefixed: Server, token: str, made_at: str,
) -> None:
    r = httpx.post(prefixed.url + made_at + "/links", headers=bearer(token),
                   json={"url": f"{PREFIX}/files/nested/data.json", "expires_in": "5m"})
    assert r.status_code == 201, r.text
    link = r.json()["url"]
    assert link.startswith(f"{prefixed.url}{PREFIX}/files/nested/data.json?")
    with_prefix = httpx.get(link)
    stripped = httpx.get(link.replace(PREFIX, "", 1))
    assert with_prefix.status_code == stripped.status_code == 200
    assert with_prefix.content == stripped.content == b'{"demo": true, "items": [1, 2, 3]}\n'
    # Still bound to its path: another file under the same signature is refused.
    other = httpx.get(link.replace("data.json", "deeper/notes.md"))
    assert other.status_code == 403


def test_cli_link_with_the_prefix_is_signed_without_it(prefixed: Server,
                                                       database_url: str) -> None:
    env = {"EXPORTER_DATABASE_URL": database_url, "EXPORTER_ROOT_PATH": PREFIX}
    out = exporter_cli("link", f"{prefixed.url}{PREFIX}/files/README.txt", "--expires", "5m",
                       env=env, check=True).stdout.strip()
    assert out.startswith(f"{prefixed.url}{PREFIX}/files/README.txt?")
    assert httpx.get(out).content == b"Demo files served by exporter.\n"


def test_sign_in_behind_tls_termination_under_root_path(prefixed: Server, token: str) -> None:
    """nginx says https (X-Forwarded-Proto), the browser's Origin is https, and the app
    itself is on plain http under a prefix: the sign-in works and the cookie is Secure."""
    public = f"https://127.0.0.1:{prefixed.port}"
    proxied = {**FORM, "X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
    r = httpx.post(prefixed.url + PREFIX + "/session", content=f"token={token}",
                   headers={**proxied, "Origin": public})
    assert r.status_code == 303, r.text
    assert r.headers["location"] == f"{PREFIX}/"
    attributes = {a.strip().lower() for a in r.headers["set-cookie"].split(";")[1:]}
    assert {"secure", "httponly", f"path={PREFIX}/", "samesite=strict"} <= attributes

    cookie = {"Cookie": f"exporter_token={token}", "X-Forwarded-Proto": "https"}
    page = httpx.get(prefixed.url + PREFIX + "/", headers=cookie)
    assert "Signed in as" in page.text
    assert httpx.get(prefixed.url + PREFIX + "/files/README.txt", headers=cookie).status_code == 200

    # The plain-http origin of the same host is another origin, and so is another site.
    for origin in (prefixed.url, "https://evil.example"):
        refused = httpx.post(prefixed.url + PREFIX + "/session", content=f"token={token}",
                             headers={**proxied, "Origin": origin})
        assert refused.status_code == 403 and "set-cookie" not in refused.headers
    bad = httpx.post(prefixed.url + PREFIX + "/session", content="token=exp_nope",
                     headers={**proxied, "Origin": public})
    assert bad.status_code == 303 and bad.headers["location"] == f"{PREFIX}/?signin=failed"
    out = httpx.post(prefixed.url + PREFIX + "/session/end", headers={**proxied, "Origin": public})
    assert out.status_code == 303 and f"path={PREFIX}/" in out.headers["set-cookie"].lower()


@pytest.mark.parametrize("value", ["exporter", "/a b", "/../x", "/files", "/datasets/x", "/x?y"])
def test_bad_root_path_is_refused_at_start(database_url: str, value: str) -> None:
    env = {"EXPORTER_DATABASE_URL": database_url, "EXPORTER_ROOT_PATH": value}
    r = exporter_cli("token", "list", env=env)
    assert r.returncode != 0 and "EXPORTER_ROOT_PATH" in r.stderr


# --- X-Accel-Redirect, straight against the app ---------------------------------------------

def test_accel_redirect_answers_checked_files_with_the_real_path_and_no_body(
    make_server: type[Server], token: str, database_url: str,
) -> None:
    server = make_server({**CLOSED, "EXPORTER_FILES_ACCEL_REDIRECT": "/internal/",
                          "EXPORTER_MAX_BYTES_PER_SECOND": "1000000"}).start()
    auth = bearer(token)
    r = httpx.get(server.url + "/files/nested/up-link.txt?disposition=inline",
                  headers={**auth, "Range": "bytes=0-3", "X-Probe": "accel"})
    assert r.status_code == 200 and r.content == b""
    # Where the link leads (nginx follows none), percent-encoded; the name asked for.
    assert r.headers["x-accel-redirect"] == "/internal/README.txt"
    assert r.headers["content-disposition"] == 'inline; filename="up-link.txt"'
    assert r.headers["content-type"] == "text/plain; charset=utf-8"
    assert r.headers["content-security-policy"] == "sandbox; default-src 'none'"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-accel-limit-rate"] == "1000000"
    # nginx's validators are the only ones: the app sends none of its own.
    assert "etag" not in r.headers and "last-modified" not in r.headers

    unicode = httpx.get(server.url + "/files/" + quote(UNICODE_NAME), headers=auth)
    assert unicode.headers["x-accel-redirect"] == "/internal/" + quote(UNICODE_NAME.encode())

    # Audit rows are written in batches (every 50 ms).
    rows = audited(database_url, "id = (SELECT max(id) FROM exporter.downloads"
                   " WHERE target = 'nested/up-link.txt')")
    assert rows and rows[0]["status"] == "proxied" and rows[0]["range"] == "bytes=0-3"
    assert rows[0]["principal"].startswith("token proxy-")

    head = httpx.head(server.url + "/files/README.txt", headers=auth)
    assert head.status_code == 200 and head.headers["x-accel-redirect"] == "/internal/README.txt"
    # Checks before any hand-over: out of the root, hidden, not a file, no credentials.
    for path in ("outside-link.txt", "etc-link/passwd", ".hidden.txt", "fifo"):
        refused = httpx.get(server.url + "/files/" + path, headers=auth)
        assert refused.status_code == 404 and "x-accel-redirect" not in refused.headers, path
    anonymous = httpx.get(server.url + "/files/README.txt")
    assert anonymous.status_code == 401 and "x-accel-redirect" not in anonymous.headers
    # Listings are the app's own answer.
    listing = httpx.get(server.url + "/files/nested/", headers=auth)
    assert listing.status_code == 200 and "x-accel-redirect" not in listing.headers


def test_accel_redirect_setting_must_be_a_location(database_url: str) -> None:
    env = {"EXPORTER_DATABASE_URL": database_url, "EXPORTER_FILES_ACCEL_REDIRECT": "internal"}
    r = exporter_cli("token", "list", env=env)
    assert r.returncode != 0 and "EXPORTER_FILES_ACCEL_REDIRECT" in r.stderr


# --- docs/deploy.md's nginx, for real ------------------------------------------------------

def deploy_config() -> str:
    """The ```nginx block of docs/deploy.md, as a reader would copy it."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    blocks = re.findall(r"```nginx\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    return blocks[0]


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


@dataclass
class Proxy:
    url: str
    cafile: Path
    upstreams: list[Server]
    access_log: Path


@pytest.fixture
def proxy(make_server: type[Server], files_root: Path, tmp_path: Path) -> Iterator[Proxy]:
    env = {**CLOSED, "EXPORTER_ROOT_PATH": PREFIX, "EXPORTER_FORWARDED_ALLOW_IPS": "127.0.0.1",
           "EXPORTER_FILES_ACCEL_REDIRECT": "/internal/"}
    upstreams = [make_server(env).start(), make_server(env).start()]
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    port = free_port()
    site = deploy_config()
    for old, new in [("listen 443 ssl", f"listen 127.0.0.1:{port} ssl"),
                     ("127.0.0.1:8001", f"127.0.0.1:{upstreams[0].port}"),
                     ("127.0.0.1:8002", f"127.0.0.1:{upstreams[1].port}"),
                     ("/etc/ssl/exporter/cert.pem", str(cert)),
                     ("/etc/ssl/exporter/key.pem", str(key)),
                     ("/srv/exporter/files/", f"{files_root}/")]:
        site = replace_once(site, old, new)
    (tmp_path / "exporter.conf").write_text(site)
    access_log = tmp_path / "access.log"
    temp = "\n".join(f"    {d} {tmp_path / d};" for d in (
        "client_body_temp_path", "proxy_temp_path", "fastcgi_temp_path", "uwsgi_temp_path",
        "scgi_temp_path"))
    # What a distribution's nginx.conf has around conf.d/*.conf; the rest is docs/deploy.md.
    (tmp_path / "nginx.conf").write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"worker_processes 1;\npid {tmp_path / 'nginx.pid'};\n"
        f"error_log {tmp_path / 'error.log'} info;\nevents {{}}\n"
        f"http {{\n    log_format upstream '\"$request\" $status $upstream_addr';\n"
        f"    access_log {access_log} upstream;\n{temp}\n"
        f"    include {tmp_path / 'exporter.conf'};\n}}\n"
    )
    process = subprocess.Popen([NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
                                "-g", "daemon off;"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    url = f"https://127.0.0.1:{port}"
    try:
        def up() -> bool:
            if process.poll() is not None:
                raise RuntimeError(process.stderr.read().decode() if process.stderr else "")
            try:
                httpx.get(url + PREFIX + "/healthz", timeout=1,
                          verify=ssl.create_default_context(cafile=str(cert)))
                return True
            except httpx.TransportError:
                return False

        assert wait_until(up, 15), (tmp_path / "error.log").read_text()
        yield Proxy(url, cert, upstreams, access_log)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGQUIT)  # graceful: workers finish, then exit
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, timeout=120)


@pytest.mark.needs("nginx", "curl", "wget")
def test_nginx_from_deploy_md_with_curl_and_wget(proxy: Proxy, token: str, files_root: Path,
                                                 tmp_path: Path, database_url: str) -> None:
    ca = ["--cacert", str(proxy.cafile)]
    base = proxy.url + PREFIX
    auth = f"Authorization: Bearer {token}"

    # An export streams through (curl, HTTP/2 over TLS).
    out = tmp_path / "orders.csv"
    r = curl(*ca, "-f", "-H", auth, "-o", str(out), "-w", "%{http_version}",
             base + "/datasets/orders.csv?order=id&limit=1000")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"2"
    rows = list(csv.reader(io.StringIO(out.read_text())))
    assert len(rows) == 1001 and rows[0][0] == "id"
    assert [int(row[0]) for row in rows[1:]] == sorted(int(row[0]) for row in rows[1:])
    # Exports stay chunked: no Content-Length spooled by nginx.
    head = curl(*ca, "-f", "-D", "-", "-o", os.devnull, "-H", auth,
                base + "/datasets/orders.ndjson?limit=3")
    assert b"content-length" not in head.stdout.lower()

    # A file: the app says yes, nginx sends the bytes; the headers of both arrive.
    got = tmp_path / "unicode.txt"
    r = curl(*ca, "-f", "-D", str(tmp_path / "h.txt"), "-H", auth, "-o", str(got),
             base + "/files/" + quote(UNICODE_NAME))
    assert r.returncode == 0, r.stderr
    assert got.read_bytes() == (files_root / UNICODE_NAME).read_bytes()
    headers = (tmp_path / "h.txt").read_text().lower()
    assert "content-disposition: attachment;" in headers
    assert "content-security-policy: sandbox; default-src 'none'" in headers
    assert "x-content-type-options: nosniff" in headers
    assert "x-accel-redirect" not in headers and "etag:" in headers
    # The internal location is not reachable by itself.
    assert curl(*ca, "-o", os.devnull, "-w", "%{http_code}",
                proxy.url + "/internal/README.txt").stdout == b"404"
    # A link out of the root is refused by the app before nginx is asked.
    assert curl(*ca, "-o", os.devnull, "-w", "%{http_code}", "-H", auth,
                base + "/files/outside-link.txt").stdout == b"404"

    # Range resume of a half file: curl -C - and wget -c, bytes equal to the original.
    large = files_root / LARGE_NAME
    size = large.stat().st_size
    expected = sha256(large)
    for tool in ("curl", "wget"):
        part = tmp_path / f"{tool}-{LARGE_NAME}"
        with large.open("rb") as src, part.open("wb") as dst:
            dst.write(src.read(size // 2))
        if tool == "curl":
            r = curl(*ca, "-f", "-C", "-", "-H", auth, "-o", str(part),
                     base + "/files/" + LARGE_NAME)
        else:
            r = subprocess.run(["wget", "-q", "-c", f"--ca-certificate={proxy.cafile}",
                                f"--header={auth}", "-O", str(part),
                                base + "/files/" + LARGE_NAME],
                               capture_output=True, timeout=120)
        assert r.returncode == 0, (tool, r.stderr)
        assert part.stat().st_size == size and sha256(part) == expected, tool
        part.unlink()
    ranged = [line for line in proxy.access_log.read_text().splitlines()
              if f"/files/{LARGE_NAME}" in line]
    assert len(ranged) == 2 and all('" 206 ' in line for line in ranged), ranged
    audit = fetch(database_url, "SELECT status, range FROM exporter.downloads WHERE target = $1"
                  " AND principal LIKE 'token proxy-%' ORDER BY id DESC LIMIT 2", LARGE_NAME)
    assert [(a["status"], a["range"]) for a in audit] == [("proxied", f"bytes={size // 2}-")] * 2

    # A signed link made through the proxy, used through the proxy with no credentials.
    made = curl(*ca, "-f", "-H", auth, "-H", "Content-Type: application/json",
                "--data", '{"url": "/exporter/files/nested/data.json", "expires_in": "5m"}',
                base + "/links")
    assert made.returncode == 0, made.stderr
    link = httpx.Response(201, content=made.stdout).json()["url"]
    assert link.startswith(base + "/files/nested/data.json?")
    via_wget = tmp_path / "data.json"
    r = subprocess.run(["wget", "-q", f"--ca-certificate={proxy.cafile}", "-O", str(via_wget),
                        link], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert via_wget.read_bytes() == (files_root / "nested" / "data.json").read_bytes()
    tampered = curl(*ca, "-o", os.devnull, "-w", "%{http_code}",
                    link.replace("data.json", "deeper/notes.md"))
    assert tampered.stdout == b"403"

    # Cookie sign-in as a browser does it (Origin: the https origin), then a download.
    jar = tmp_path / "cookies.txt"
    r = curl(*ca, "-D", "-", "-o", os.devnull, "-c", str(jar), "-H", f"Origin: {proxy.url}",
             "--data-urlencode", f"token={token}", base + "/session")
    assert r.stdout.startswith(b"HTTP/2 303"), r.stdout
    set_cookie = next(line for line in r.stdout.decode().splitlines()
                      if line.lower().startswith("set-cookie:"))
    assert "secure" in set_cookie.lower() and f"path={PREFIX}/" in set_cookie.lower()
    with_cookie = tmp_path / "readme.txt"
    r = curl(*ca, "-f", "-b", str(jar), "-o", str(with_cookie), base + "/files/README.txt")
    assert r.returncode == 0, r.stderr
    assert with_cookie.read_bytes() == b"Demo files served by exporter.\n"
    page = curl(*ca, "-f", "-b", str(jar), base + "/").stdout.decode()
    assert "Signed in as" in page and f'href="{base}/files/README.txt"' in page

    # Both exporter processes served requests.
    used = {line.rsplit(" ", 1)[1] for line in proxy.access_log.read_text().splitlines()}
    assert {f"127.0.0.1:{s.port}" for s in proxy.upstreams} <= used, used
