"""A throwaway MariaDB server of our own, for the tests that kill and restart the server.

The shared server (127.0.0.1:3306) is never touched: this one is made with
`mariadb-install-db` in a temporary directory and runs on a spare loopback port
(root without a password), and is removed afterwards.
"""

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

__all__ = ["ThrowawayMariaDB", "find_mariadb"]


def find_mariadb() -> tuple[str, str] | None:
    """The `mariadbd` and `mariadb-install-db` binaries, if both are installed."""
    server = shutil.which("mariadbd") or shutil.which("mariadbd", path="/usr/sbin:/usr/local/sbin")
    install = shutil.which("mariadb-install-db")
    return (server, install) if server and install else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ThrowawayMariaDB:
    """mariadb-install-db + mariadbd in a temp dir; `kill()`/`start()` simulate a crash and a restart."""

    def __init__(self, server: str, install: str) -> None:
        self.server, self.install = server, install
        self.port = _free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="ft-mariadb-"))
        self.datadir = self.workdir / "data"
        self.log = self.workdir / "server.log"
        self.process: asyncio.subprocess.Process | None = None
        # mariadbd refuses to run as root unless told to.
        self._user = ["--user=root"] if os.geteuid() == 0 else []

    @property
    def url(self) -> str:
        """The server URL, no database: add one with `.set(database=...)` or a path."""
        return f"mysql+aiomysql://root@127.0.0.1:{self.port}/"

    def init(self) -> None:
        subprocess.run(
            [
                self.install,
                "--no-defaults",
                f"--datadir={self.datadir}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                *self._user,
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )

    async def start(self) -> None:
        """Start the server and return once it accepts connections."""
        import aiomysql

        self.process = await asyncio.create_subprocess_exec(
            self.server,
            "--no-defaults",
            f"--datadir={self.datadir}",
            f"--socket={self.workdir / 'sock'}",
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            f"--log-error={self.log}",
            f"--pid-file={self.workdir / 'pid'}",
            "--skip-log-bin",
            "--innodb-buffer-pool-size=16M",
            # A crash of the server alone loses nothing the OS already holds.
            "--innodb-flush-log-at-trx-commit=2",
            "--max-connections=60",
            *self._user,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for _ in range(600):
            assert self.process.returncode is None, f"mariadbd exited; see {self.log}"
            try:
                conn = await aiomysql.connect(
                    host="127.0.0.1", port=self.port, user="root", connect_timeout=1
                )
            except Exception:  # not accepting yet: any connect failure
                await asyncio.sleep(0.05)
                continue
            conn.close()
            return
        raise AssertionError(f"mariadbd did not accept connections; see {self.log}")

    async def kill(self) -> None:
        """A crash: SIGKILL, every client cut off at once, no shutdown."""
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
            await self.process.wait()

    async def sql(self, statement: str) -> None:
        """Run one statement on the server, outside any database."""
        import aiomysql

        conn = await aiomysql.connect(host="127.0.0.1", port=self.port, user="root", autocommit=True)
        try:
            async with conn.cursor() as cur:
                await cur.execute(statement)
        finally:
            conn.close()

    async def destroy(self) -> None:
        await self.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)
