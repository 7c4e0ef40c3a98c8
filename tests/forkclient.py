"""`python -m MODULE ARGS` run by this worker's fork server (tests/forkserver.py), for the
commands the tests start from a shell (the docs' `.venv/bin/exporter`, say): the command
runs in a child of the fork server, with this process's standard streams, folder and
environment, and this process exits as the command does. A Python that imports the app
spends about 0.8 s of a core before the command's first line; this client imports the
standard library's socket and json only (run it with `python -I -S`).

    python -I -S tests/forkclient.py SOCKET MODULE [ARGS...]

SIGINT, SIGTERM and SIGHUP sent to this process go to the command (a shell's `timeout`, a
test that stops it)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys


def main() -> None:
    path, module, *args = sys.argv[1:]
    channel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    channel.connect(path)
    request = {"module": module, "args": args, "env": dict(os.environ), "cwd": os.getcwd()}
    socket.send_fds(channel, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
    answers = channel.makefile("rb")
    started = json.loads(answers.readline())
    if "error" in started:
        print(f"forkclient: {started['error']}", file=sys.stderr)
        sys.exit(1)
    pid = int(started["pid"])
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda received, _: os.kill(pid, received))
    line = answers.readline()
    status = int(json.loads(line)["status"]) if line else 1
    if status < 0:  # ended by a signal: end by the same one, as the shell then sees
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    sys.exit(status)


if __name__ == "__main__":
    main()
