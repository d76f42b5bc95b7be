"""A throwaway PostgreSQL cluster of our own, for the tests that stop and restart the server.

The shared server (127.0.0.1:5432) is never touched: this one is made with `initdb`
in a temporary directory, runs as the `postgres` user on a spare loopback port
with trust authentication, and is removed afterwards.
"""

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

__all__ = ["ThrowawayPostgres", "find_postgres_bin"]


def find_postgres_bin() -> Path | None:
    """The newest `/usr/lib/postgresql/<major>/bin` holding initdb and pg_ctl, if any."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return found[-1].parent if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ThrowawayPostgres:
    """initdb + pg_ctl in a temp dir; `stop()`/`start()` simulate an outage and a restart."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = _free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="ft-pgcluster-"))
        self.datadir = self.workdir / "data"
        self.log = self.workdir / "server.log"
        os.chmod(self.workdir, 0o777)  # initdb and postgres run as the postgres user

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / args[0]), *args[1:]]
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, check=check, capture_output=True, text=True, timeout=120)

    def init(self) -> None:
        self._run(
            "initdb", "-D", str(self.datadir), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"
        )
        self.start()

    def start(self) -> None:
        # Small and quick: a handful of connections, no fsync (the OS keeps what a
        # crash of the server alone would lose anyway, so committed data survives).
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{self.workdir}' "
            "-c max_connections=60 -c fsync=off -c shared_buffers=16MB"
        )
        self._run(
            "pg_ctl", "-D", str(self.datadir), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start"
        )

    def stop(self, mode: str = "immediate", *, wait: bool = True) -> None:
        """Stop the server; `immediate` is a crash (no shutdown checkpoint, clients cut off).

        `smart` without `wait` starts a shutdown that waits for the open sessions to end;
        meanwhile new connections are refused ("the database system is shutting down").
        """
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w" if wait else "-W", "-t", "60", "stop")

    def ensure_running(self) -> None:
        """Start the server if a test left it stopped."""
        status = self._run("pg_ctl", "-D", str(self.datadir), "status", check=False)
        if status.returncode != 0:
            self.start()

    def destroy(self) -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)
