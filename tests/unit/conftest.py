"""The store's two backends, for tests that must hold on both: `db` runs a test once on SQLite
and once on a real PostgreSQL server (one throwaway cluster per test run, a database per test).
Without PostgreSQL installed, the PostgreSQL runs skip and say what to install."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cicd import store
from cicd.config import ENVIRONMENTS, Settings
from tests.postgres_server import PostgresServer, Unavailable


@pytest.fixture(scope="session")
def postgres_server():
    try:
        server = PostgresServer()
    except Unavailable as exc:
        pytest.skip(str(exc))
    try:
        server.start()
    except Unavailable as exc:
        server.stop()
        pytest.skip(f"could not start a PostgreSQL server: {exc}")
    yield server
    store.dispose_engines()
    server.stop()


@dataclass
class Backend:
    name: str                      # sqlite or postgresql
    home: Path
    server: PostgresServer | None = None
    databases: list[str] = field(default_factory=list)
    _shared: str | None = None

    def database_url(self, one_per_env: bool = False) -> str | None:
        """The CICD_DATABASE_URL for this backend: one database for every environment, or (with
        "{env}" in it) one per environment. None is the default: SQLite, a file per environment."""
        if self.server is None:
            return None if one_per_env else f"sqlite:///{self.home / 'shared.db'}"
        if one_per_env:
            base = self.server.fresh_name()
            for env in ENVIRONMENTS:
                self._create(f"{base}_{env}")
            return self.server.url(base + "_{env}")
        if self._shared is None:
            self._shared = self.server.fresh_name()
            self._create(self._shared)
        return self.server.url(self._shared)

    def _create(self, name: str) -> None:
        self.server.create_database(name)
        self.databases.append(name)

    def settings(self, env: str = "stage", **kw) -> Settings:
        """Settings on this backend: SQLite's default file, or the test's PostgreSQL database."""
        url = None if self.server is None else self.database_url()
        return Settings(env=env, home=self.home, database_url_override=url, **kw)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    server = request.getfixturevalue("postgres_server") if request.param == "postgresql" else None
    backend = Backend(request.param, tmp_path, server)
    yield backend
    # Pooled connections would keep each dropped database open (and use up the server's slots).
    store.dispose_engines()
    for name in backend.databases:
        server.drop_database(name)
