"""A throwaway cluster of a Debian-packaged PostgreSQL (`postgresql-15`): the second
version the suite runs on, beside the embedded one.

It lives in a folder of the pytest temp folder, listens on 127.0.0.1 only, on a free
port, with its unix socket in that folder too, and is stopped with `pg_ctl stop -m
immediate` (nothing in it is worth a checkpoint). PostgreSQL refuses to run as root:
as root, initdb and pg_ctl run as the package's `postgres` user.
"""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
from pathlib import Path

from tests.support import free_port


def bin_dir(major: int) -> Path:
    return Path(f"/usr/lib/postgresql/{major}/bin")


def missing(major: int) -> str | None:
    """Why a cluster of this version cannot be started here, or None if it can."""
    if not (bin_dir(major) / "pg_ctl").exists():
        return f"postgresql-{major} is not installed (no {bin_dir(major)}/pg_ctl)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and there is no user `postgres` to run PostgreSQL as"
    return None


class DebianPostgres:
    def __init__(self, major: int, base: Path) -> None:
        self.major = major
        self.base = base.resolve()
        self.data = self.base / "data"
        self.sockets = self.base / "s"
        self.log = self.base / "server.log"
        self.port = 0
        self._started = False

    def _run(self, *command: str) -> None:
        as_postgres = os.geteuid() == 0
        done = subprocess.run(
            [str(bin_dir(self.major) / command[0]), *command[1:]],
            cwd=self.base, capture_output=True, text=True, timeout=120,
            user="postgres" if as_postgres else None,
            group="postgres" if as_postgres else None,
            extra_groups=[] if as_postgres else None,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8",
                 "TZ": "UTC"},
        )
        if done.returncode != 0:
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            raise RuntimeError(f"{command[0]} failed ({done.returncode}):"
                               f" {done.stdout}{done.stderr}{log}")

    def _hand_over(self) -> None:
        """As root: the folder becomes the postgres user's, and it may reach it (the
        pytest temp folder is private to us)."""
        if os.geteuid() != 0:
            return
        user = pwd.getpwnam("postgres")
        os.chown(self.base, user.pw_uid, user.pw_gid)
        for parent in self.base.parents:
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                parent.chmod(mode | stat.S_IXOTH)

    def start(self) -> str:
        """initdb, then start; returns a libpq URI of its `postgres` database."""
        self.base.mkdir(parents=True, exist_ok=True)
        self._hand_over()
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync")
        self.sockets.mkdir()
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.sockets, user.pw_uid, user.pw_gid)
        self.port = free_port()
        options = " ".join([
            "-c listen_addresses=127.0.0.1", f"-c port={self.port}",
            f"-c unix_socket_directories={self.sockets}",
            # A throwaway cluster: nothing in it needs to survive a crash.
            "-c fsync=off",
        ])
        self._started = True
        self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w",
                  "-t", "60", "-o", options)
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        if self._started and (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w")
        self._started = False
