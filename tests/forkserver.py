"""A fork server for the tests' `exporter serve` processes: one Python per xdist worker that
has imported the command, the app, uvicorn and Alembic once, and forks a server from there.

A server started with `python -m exporter.cli serve` spent about 1.0-1.7 s of a core before
it answered, over 80 % of it importing (FastAPI, SQLAlchemy, pydantic, Alembic), and the
suite starts about a hundred of them. A forked one runs the same `exporter.cli` module as
`__main__` (runpy, as `python -m` does), in a process of its own: its own session, its
environment, folder and arguments as asked, stdout and stderr into its log, exit status and
signals as a spawned one's. Only the imports happened earlier, in the fork server.

tests/support.py's Server asks it for `python -m MODULE ...` commands in the checkout whose
environment gives the interpreter nothing else to do (PYTHON* variables as the fork
server's); anything else is spawned as before. The benchmark (bench/) spawns its servers:
it measures their start-up.

The protocol, over a socket pair: one JSON line per request, {"module", "args", "env",
"cwd", "log"}, answered {"pid"} (or {"error"}); when a child ends, {"exited", "status"}."""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import importlib.util
import json
import os
import runpy
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

# What `exporter serve` imports before it answers (the command, the app uvicorn loads, the
# migrations it runs), and the protocol uvicorn picks.
PRELOAD = ["exporter.cli", "exporter.app", "uvicorn.main", "uvicorn.server",
           "uvicorn.lifespan.on", "uvicorn.loops.uvloop", "uvicorn.protocols.http.httptools_impl",
           "uvicorn.protocols.websockets.websockets_sansio_impl", "alembic.command",
           "alembic.runtime.migration", "alembic.runtime.environment", "alembic.script"]
_ROOT = Path(__file__).resolve().parent.parent


# --- the fork server's side ---------------------------------------------------------------

def _serve(channel: socket.socket, commands: socket.socket | None
           ) -> Callable[[], None] | None:
    """Answer requests until the worker closes its end; in a forked child, return what the
    child runs instead (the caller runs it outside every block of this function).
    `commands`: a listening socket for tests/forkclient.py, whose requests bring the
    client's standard streams and are answered on their own connection."""
    reaped, wake = os.pipe()
    os.set_blocking(reaped, False)
    os.set_blocking(wake, False)
    signal.set_wakeup_fd(wake)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    # Each child, where its exit is reported (the worker's channel or a client's
    # connection) and whether that is a client's.
    children: dict[int, tuple[socket.socket, bool]] = {}
    selector = selectors.DefaultSelector()
    selector.register(channel, selectors.EVENT_READ)
    selector.register(reaped, selectors.EVENT_READ)
    if commands is not None:
        selector.register(commands, selectors.EVENT_READ)
    reader = channel.makefile("rb")
    while True:
        for key, _ in selector.select():
            streams: list[int] = []
            if key.fileobj == reaped:
                with contextlib.suppress(BlockingIOError):
                    os.read(reaped, 4096)
                _report_exits(children)
                continue
            if key.fileobj == commands:
                assert commands is not None
                answer_to, _ = commands.accept()
                request, streams = _command_request(answer_to)
            else:
                line = reader.readline()
                if not line:
                    return None
                answer_to, request = channel, json.loads(line)
            try:
                pid = os.fork()
            except OSError as error:
                _send(answer_to, {"error": str(error)})
                continue
            if pid == 0:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                selector.close()
                for fd in (reaped, wake):
                    os.close(fd)
                reader.close()
                for other in {channel, commands, answer_to, *(c for c, _ in children.values())}:
                    if other is not None:
                        other.close()
                return lambda: _child(request, streams)
            for fd in streams:
                os.close(fd)
            children[pid] = (answer_to, answer_to is not channel)
            with contextlib.suppress(OSError):
                _send(answer_to, {"pid": pid})


def _command_request(connection: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """A client's request line and the three streams that came with it."""
    data, streams, _, _ = socket.recv_fds(connection, 1 << 16, 3)
    while not data.endswith(b"\n"):
        more = connection.recv(1 << 16)
        if not more:
            break
        data += more
    return json.loads(data), list(streams)


def _report_exits(children: dict[int, tuple[socket.socket, bool]]) -> None:
    for pid in list(children):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            answer_to, client = children.pop(pid)
            with contextlib.suppress(OSError):  # a client that was killed
                _send(answer_to, {"exited": pid, "status": os.waitstatus_to_exitcode(status)})
            if client:
                answer_to.close()


def _send(channel: socket.socket, message: dict[str, Any]) -> None:
    channel.sendall(json.dumps(message).encode() + b"\n")


def _child(request: dict[str, Any], streams: Sequence[int]) -> None:
    """Become `python -m MODULE ARGS` as asked. A server: a session of its own (the tests
    stop a server's whole group), its log as stdout and stderr, nothing on stdin. A
    client's command: the client's three streams."""
    if streams:
        for target, fd in enumerate(streams):
            os.dup2(fd, target)
            os.close(fd)
    else:
        os.setsid()
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.close(null)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = [request["module"], *request["args"]]
    # As `python -m` finds the module it runs (a package's __main__): not imported yet
    # (runpy warns otherwise); what it imports is.
    spec = importlib.util.find_spec(request["module"])
    package = spec is not None and spec.submodule_search_locations is not None
    sys.modules.pop(request["module"] + (".__main__" if package else ""), None)
    # SystemExit leaves through the interpreter's own exit, as the spawned process's would.
    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)


def main() -> None:
    channel = socket.socket(fileno=int(sys.argv[1]))
    commands = None
    if len(sys.argv) > 2:
        commands = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Under its name only once it listens: a client that finds the name can connect.
        commands.bind(sys.argv[2] + ".new")
        commands.listen(16)
        os.rename(sys.argv[2] + ".new", sys.argv[2])
    for name in PRELOAD:
        importlib.import_module(name)
    # What was imported stays out of the collector's scans: a child's collections would
    # otherwise touch, and so copy, every page the fork shares with it.
    gc.freeze()
    sys.stdout.flush()
    sys.stderr.flush()
    child = _serve(channel, commands)
    if child is not None:
        try:
            child()
            status = 0
        except SystemExit as done:
            status = _exit_status(done.code)
        except BaseException:
            traceback.print_exc()
            status = 1
        # What an exit does (join the other threads, atexit, flush the streams), then out
        # without freeing every object the fork server imported, one by one: that was
        # over half of a short command's CPU.
        getattr(threading, "_shutdown", lambda: None)()
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(status)


def _exit_status(code: object) -> int:
    """The status `sys.exit(code)` gives (its message printed, as Python prints it)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


# --- the worker's side --------------------------------------------------------------------

class ForkedProcess:
    """What tests/support.py asks of a subprocess.Popen, for a process the fork server
    made (it is that server's child: the server reports its exit status)."""

    def __init__(self, forks: ForkServer, pid: int, args: Sequence[str]) -> None:
        self._forks = forks
        self.pid = pid
        self.args = list(args)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._forks.status(self.pid, 0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self._forks.status(self.pid, timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """This worker's fork server, started at its first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = threading.Condition()
        self._exits: dict[int, int] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._channel: socket.socket | None = None
        self._answers: list[dict[str, Any]] = []
        self.interpreter_env = {k: v for k, v in os.environ.items() if k.startswith("PYTHON")}
        # Where tests/forkclient.py asks for commands (a short path: a unix socket's is
        # at most 107 bytes).
        self._folder = Path(tempfile.mkdtemp(prefix="forks-"))
        self.commands_socket = self._folder / "commands"

    def client(self, module: str) -> list[str]:
        """The command line that runs `python -m MODULE` (arguments to follow) as a child
        of this fork server, with the caller's streams, folder and environment."""
        with self._lock:
            self._started()
            deadline = time.monotonic() + 60
            while not self.commands_socket.exists():
                if self._process is None or self._process.poll() is not None \
                        or time.monotonic() > deadline:
                    raise RuntimeError("the fork server did not start")
                time.sleep(0.01)
        return [sys.executable, "-I", "-S", str(_ROOT / "tests" / "forkclient.py"),
                str(self.commands_socket), module]

    def can_run(self, command: Sequence[str], env: Mapping[str, str], cwd: Path) -> bool:
        """Whether `command` is `python -m MODULE ...` of this interpreter, from the
        checkout, with an environment that asks the interpreter for nothing else."""
        return (len(command) >= 3 and command[0] == sys.executable and command[1] == "-m"
                and cwd == _ROOT
                and {k: v for k, v in env.items() if k.startswith("PYTHON")
                     and k != "PYTHONUNBUFFERED"} == {
                         k: v for k, v in self.interpreter_env.items()
                         if k != "PYTHONUNBUFFERED"}
                and env.get("PYTHONUNBUFFERED") == "1")

    def start(self, command: Sequence[str], env: Mapping[str, str], cwd: Path,
              log_path: Path) -> ForkedProcess:
        with self._lock:
            channel = self._started()
            with self._done:
                _send(channel, {"module": command[2], "args": list(command[3:]),
                                "env": dict(env), "cwd": str(cwd), "log": str(log_path)})
                while not self._answers:
                    if not self._done.wait(60):
                        raise RuntimeError("the fork server did not answer")
                answer = self._answers.pop(0)
        if "error" in answer:
            raise OSError(answer["error"])
        return ForkedProcess(self, int(answer["pid"]), command)

    def status(self, pid: int, timeout: float | None) -> int | None:
        with self._done:
            self._done.wait_for(lambda: pid in self._exits, timeout)
            return self._exits.get(pid)

    def _started(self) -> socket.socket:
        if self._channel is not None:
            return self._channel
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.forkserver", str(theirs.fileno()),
             str(self.commands_socket)],
            cwd=_ROOT, env=env, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
            start_new_session=True)
        theirs.close()
        self._channel = ours
        threading.Thread(target=self._read, args=(ours,), daemon=True,
                         name="fork-server").start()
        return ours

    def _read(self, channel: socket.socket) -> None:
        for line in channel.makefile("rb"):
            message = json.loads(line)
            with self._done:
                if "exited" in message:
                    self._exits[int(message["exited"])] = int(message["status"])
                else:
                    self._answers.append(message)
                self._done.notify_all()
        with self._done:  # the fork server is gone: no answer will come
            self._answers.append({"error": "the fork server exited"})
            self._done.notify_all()

    def close(self) -> None:
        """Stop the fork server (its children, the servers, are stopped by their owners)."""
        channel, process, self._channel, self._process = (
            self._channel, self._process, None, None)
        if channel is not None:
            channel.close()
        if process is not None:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        shutil.rmtree(self._folder, ignore_errors=True)


if __name__ == "__main__":
    main()
