"""A private PostgreSQL server for tests that restart or stop it (the shared one on 5432 is left
alone): its own data directory, socket directory and loopback port, run as the ``postgres`` user
(PostgreSQL refuses to run as root), trust authentication, stopped and removed on the way out."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vfsupport import free_port

#: Debian's PostgreSQL binaries (the server is not on PATH)
_BIN_GLOB = "/usr/lib/postgresql/*/bin"


def server_bin() -> Path | None:
    """The directory of ``pg_ctl`` and ``initdb``, None when PostgreSQL is not installed."""
    found = sorted(Path("/").glob(_BIN_GLOB.lstrip("/")))
    return found[-1] if found and (found[-1] / "pg_ctl").exists() else None


@dataclass
class PostgresServer:
    """A running private server; ``url``: its ``virtfleet`` database."""

    bin: Path
    data: Path
    sockets: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/virtfleet"

    def _ctl(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", str(self.bin / "pg_ctl"), "-D", str(self.data), *args],
            check=True,
            capture_output=True,
            timeout=timeout,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._ctl("start", "-w", "-l", str(self.data / "server.log"), "-o", options)

    def stop(self, mode: str = "fast") -> None:
        self._ctl("stop", "-w", "-m", mode)

    def restart(self) -> None:
        """Stop (fast: every session terminated, as a failover or a restart does) and start."""
        self.stop("fast")
        self.start()

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()


@contextlib.contextmanager
def private_postgres() -> Iterator[PostgresServer]:
    """A fresh PostgreSQL server on a free loopback port with an empty ``virtfleet`` database."""
    pg_bin = server_bin()
    if pg_bin is None:
        raise RuntimeError("PostgreSQL's server binaries are not installed (deploy/install.sh installs them)")
    postgres = pwd.getpwnam("postgres")
    root = Path(tempfile.mkdtemp(prefix="vf-pg-"))
    os.chmod(root, 0o755)
    data, sockets = root / "data", root / "sockets"
    for directory in (data, sockets):
        directory.mkdir()
        os.chown(directory, postgres.pw_uid, postgres.pw_gid)
    server = PostgresServer(pg_bin, data, sockets, free_port())
    try:
        subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                str(pg_bin / "initdb"),
                "-D",
                str(data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        server.start()
        subprocess.run(
            [
                str(pg_bin / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(server.port),
                "-U",
                "postgres",
                "virtfleet",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        yield server
    finally:
        if server.running():
            with contextlib.suppress(subprocess.SubprocessError):
                server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
