"""A throwaway PostgreSQL cluster for the tests: initdb into a temporary directory, listen on a
Unix socket there only (no TCP port to collide with), trust the one test user, stop and delete
it all at the end. Each test gets a database of its own (CREATE DATABASE is a file copy: fast).

PostgreSQL refuses to run as root, so under root the server runs as the `postgres` user that the
Debian package creates. No password exists anywhere: the socket's directory is the access control.
"""
from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

USER = "cicd_test"
INSTALL_HINT = ("PostgreSQL is not installed: `apt-get install postgresql` (Debian/Ubuntu), "
                "`brew install postgresql` (macOS), or put initdb and pg_ctl on PATH")


class Unavailable(Exception):
    """Why no server can be started here; the PostgreSQL tests skip with this reason."""


def find_bindir() -> Path:
    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        if out.returncode == 0:
            candidates.append(out.stdout.strip())
    # Debian keeps the server binaries off PATH, one directory per major version: newest first.
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                         key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
                         reverse=True)
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).resolve().parent))
    for bindir in candidates:
        if all((Path(bindir) / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(bindir)
    raise Unavailable(INSTALL_HINT)


class PostgresServer:
    def __init__(self) -> None:
        try:
            import psycopg2  # noqa: F401  (the driver the store uses)
        except ImportError:
            raise Unavailable("the psycopg2 driver is missing: pip install -e . (setup.cfg lists "
                              "psycopg2-binary)") from None
        self.bindir = find_bindir()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise Unavailable("running as root and there is no `postgres` user to run the "
                                  "server as (PostgreSQL refuses root)") from None
            self.as_user = ["runuser", "-u", "postgres", "--"]
        # Short path: a Unix socket's path must fit in about 100 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="cicd-pg-"))
        if self.as_user:
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        self.data, self.log = self.root / "data", self.root / "server.log"
        self._names = itertools.count(1)
        self.started = False

    def _run(self, *args: str) -> None:
        out = subprocess.run([*self.as_user, str(self.bindir / args[0]), *args[1:]], cwd=self.root,
                             capture_output=True, text=True)
        if out.returncode != 0:
            log = self.log.read_text(errors="replace")[-1500:] if self.log.exists() else ""
            raise Unavailable(f"{args[0]} failed ({out.returncode}): {out.stderr.strip()[-800:]} {log}")

    def start(self) -> "PostgresServer":
        self._run("initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")
        # Durability off: a test cluster is thrown away, and fsync is most of what CREATE DATABASE
        # and each commit would cost.
        options = (f"-c listen_addresses='' -c unix_socket_directories='{self.root}' "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")
        self.started = True
        return self

    def stop(self) -> None:
        if self.started:
            subprocess.run([*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast",
                            "-w", "stop"], cwd=self.root, capture_output=True)
            self.started = False
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str) -> str:
        return f"postgresql+psycopg2://{USER}@/{database}?host={self.root}"

    def _admin(self, sql: str) -> None:
        import psycopg2
        conn = psycopg2.connect(dbname="postgres", user=USER, host=str(self.root))
        try:
            conn.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    def fresh_name(self) -> str:
        return f"t{next(self._names)}"

    def create_database(self, name: str) -> None:
        self._admin(f'CREATE DATABASE "{name}"')

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
