"""Engines, transactions and sessions, and the row helpers the healing chain shares.

SQLite (WAL) under var/ENV/ by default, PostgreSQL by CICD_DATABASE_URL.

Concurrency: one writer per database at a time, on both backends, because the write steps read,
check and then write (a claim checked again before it is made, a budget counted before an
action, an upsert) and were written for that. On SQLite every write transaction starts with
BEGIN IMMEDIATE, so writers from many worker processes queue on the database lock instead of
failing half-way with "database is locked"; on PostgreSQL it starts by taking a transaction-level
advisory lock. Readers never wait: WAL on SQLite, a REPEATABLE READ snapshot on PostgreSQL, so a
reader sees one commit's state throughout (the proof head and the records behind it agree).

Two ways in, one per kind of code: `session_scope` (the ORM) for commands, reports and
everything else that runs now and then; `transaction` (SQLAlchemy Core, prebuilt statements) for
the healing chain's hops, which run for every incident and where the ORM's unit of work cost
more than the work itself (`make bench`). Both commit the same way and write the proof mirror.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from typing import Iterator

from sqlalchemy import bindparam, create_engine, event, select, update
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from cicd.config import ConfigError, Settings
from cicd.store.models import App, Base, Incident


_engines: dict[tuple[int, str], Engine] = {}
_lock = threading.Lock()


def _sqlite_engine(url: str) -> Engine:
    # A pool (one engine per process, made after any fork): connecting and the PRAGMAs below cost
    # more than most of our transactions, so each connection is made once and reused.
    engine = create_engine(url, pool_size=4, max_overflow=8, pool_pre_ping=False)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        # Let SQLAlchemy's BEGIN below be the only transaction control (pysqlite's own
        # implicit BEGIN is deferred and would let two writers deadlock on upgrade).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        # The wait first: switching a new database to WAL takes its lock, and without a busy
        # timeout a process that finds it taken fails at once with "database is locked".
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        # Writers take the lock up front (no deadlock on upgrade); readers do not take it at all
        # (in WAL mode they see the last commit and never wait for, or block, a writer).
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get("readonly") else "BEGIN IMMEDIATE")

    return engine


# Any fixed number: advisory locks are per database, and only our writers take this one.
WRITER_LOCK_KEY = 7_316_001


def _postgresql_engine(url: str) -> Engine:
    engine = create_engine(url, pool_size=4, max_overflow=8, pool_pre_ping=True)

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        # PostgreSQL's BEGIN IMMEDIATE: held until commit or rollback, freed if the client dies.
        if not conn.get_execution_options().get("readonly"):
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({WRITER_LOCK_KEY})")

    return engine


def _create_schema(engine: Engine, url: str) -> None:
    try:
        Base.metadata.create_all(engine)
    except OperationalError as exc:
        # Name the database, never the password; "{env}" URLs need one database per environment.
        shown = make_url(url).render_as_string(hide_password=True)
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise ConfigError(f"CICD_DATABASE_URL: cannot use {shown}: {reason} (the database must exist; "
                          "with {env} in the URL, one per environment: cicd_dev, cicd_stage, ...)") from None


def engine_for(settings: Settings) -> Engine:
    """One engine per process and URL; a forked worker child gets its own (keyed by pid)."""
    url = settings.database_url
    key = (os.getpid(), url)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            if url.startswith("sqlite:///"):
                path = url[len("sqlite:///"):]
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                engine = _sqlite_engine(url)
                # Processes that start together (a worker's forked pool) all create the schema:
                # one at a time, on the writers' lock file (a lock of its own here, as this
                # process's writer lock is not made yet).
                fd = os.open(path + ".writer-lock", os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    _create_schema(engine, url)
                finally:
                    os.close(fd)  # and with it the lock
            elif url.startswith("postgresql"):
                engine = _postgresql_engine(url)
                _create_schema(engine, url)
            else:
                raise ConfigError(f"CICD_DATABASE_URL: {make_url(url).drivername!r} is not supported: "
                                  "use sqlite:///PATH or postgresql+psycopg2://USER@HOST/DB")
            _engines[key] = engine
        return engine


_writer_locks: dict[tuple[int, str], tuple[threading.RLock, int]] = {}


@contextlib.contextmanager
def _one_writer(settings: Settings):
    """On SQLite, writers queue on a file lock before BEGIN IMMEDIATE. SQLite's own wait for a
    busy database polls with sleeps of up to 100 ms; the kernel wakes a flock waiter the moment
    the lock is free. Under load that is the difference between queueing and idling.

    A flock belongs to the open file, which a process's threads share: the threads of one
    worker queue on a thread lock first, then the process on the file lock."""
    url = settings.database_url
    if not url.startswith("sqlite:///"):
        yield
        return
    key = (os.getpid(), url)
    entry = _writer_locks.get(key)
    if entry is None:
        with _lock:
            entry = _writer_locks.get(key)
            if entry is None:
                fd = os.open(url[len("sqlite:///"):] + ".writer-lock", os.O_RDWR | os.O_CREAT, 0o600)
                entry = _writer_locks[key] = (threading.RLock(), fd)
    in_process, fd = entry
    with in_process:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


_readonly: dict[Engine, Engine] = {}
# Where proof.append leaves the records of a transaction for the mirror (session or connection info).
PROOF_PENDING = "proof_appended"
# What runs after a commit that appended proof records (the proof module's mirror writer, which
# registers itself: this module must not import the proof chain, which is built on it).
_after_proof_commit: list = []


def after_proof_commit(hook):
    """Register hook(settings, committed_records), run after every commit that appended some."""
    _after_proof_commit.append(hook)
    return hook


def _committed(settings: Settings, records: list) -> None:
    for hook in _after_proof_commit:
        hook(settings, records)
# The settings' clock, for the proof records' timestamps: the steps judge progress (a stall, a
# time to recover) by them, so they must come from the clock the steps run on.
PROOF_CLOCK = "proof_clock"


def _engine(settings: Settings, readonly: bool) -> Engine:
    engine = engine_for(settings)
    if not readonly:
        return engine
    ro = _readonly.get(engine)
    if ro is None:
        if engine.dialect.name == "postgresql":
            # A snapshot for the whole transaction, as SQLite's WAL readers get.
            ro = engine.execution_options(readonly=True, isolation_level="REPEATABLE READ",
                                          postgresql_readonly=True)
        else:
            ro = engine.execution_options(readonly=True)
        _readonly[engine] = ro
    return ro


@contextlib.contextmanager
def transaction(settings: Settings, readonly: bool = False) -> Iterator[Connection]:
    """A Core transaction (the healing chain's hot path): commit on success, roll back on any
    error, then write the proof mirror. readonly: as for session_scope."""
    pending: list = []
    engine = _engine(settings, readonly)
    with contextlib.nullcontext() if readonly else _one_writer(settings):
        with engine.begin() as conn:
            # The connection is pooled: what proof.append leaves here must not outlive this
            # transaction (a rolled-back record must never reach the mirror).
            conn.info[PROOF_PENDING], conn.info[PROOF_CLOCK] = pending, settings.clock
            try:
                yield conn
            finally:
                conn.info.pop(PROOF_PENDING, None)
                conn.info.pop(PROOF_CLOCK, None)
    if pending:
        _committed(settings, pending)


@event.listens_for(Session, "after_rollback")
def _forget_rolled_back_records(session: Session) -> None:
    # A record rolled back must neither reach the mirror nor serve as the chain's head.
    session.info.pop(PROOF_PENDING, None)


@contextlib.contextmanager
def session_scope(settings: Settings, readonly: bool = False) -> Iterator[Session]:
    """A transaction: commit on success, roll back on any error, then write the proof mirror.

    readonly: for reads only; it neither waits for nor blocks the writers (and on PostgreSQL a
    write in it fails)."""
    session = Session(bind=_engine(settings, readonly), expire_on_commit=False, info={PROOF_CLOCK: settings.clock})
    try:
        with contextlib.nullcontext() if readonly else _one_writer(settings):
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise
    finally:
        session.close()
    appended = session.info.get(PROOF_PENDING)
    if appended:
        _committed(settings, appended)


def get_app(session: Session, env: str, name: str) -> App | None:
    return session.scalar(select(App).where(App.env == env, App.name == name))


# -- The healing chain's shared statements (Core, built once; rows read like the ORM objects) --
_APP_ROW = select(App.__table__).where(App.env == bindparam("env"), App.name == bindparam("name"))
_INCIDENT_ROW = select(Incident.__table__).where(Incident.id == bindparam("id"))
_INCIDENT_ROW_LOCKED = _INCIDENT_ROW.with_for_update()
# The SET clause is taken from the parameters given: one statement for every change of an incident.
_UPDATE_INCIDENT = update(Incident.__table__).where(Incident.__table__.c.id == bindparam("k_id"))


def connection_of(tx: Session | Connection) -> Connection:
    """The Core connection of a transaction, whichever way it was begun."""
    return tx.connection() if isinstance(tx, Session) else tx


def app_row(conn: Connection, env: str, name: str):
    return conn.execute(_APP_ROW, {"env": env, "name": name}).first()


def incident_row(conn: Connection, incident_id: str, lock: bool = False):
    """lock: for a read-modify-write (a row lock on PostgreSQL; SQLite's writer holds the file)."""
    return conn.execute(_INCIDENT_ROW_LOCKED if lock else _INCIDENT_ROW, {"id": incident_id}).first()


def update_incident(conn: Connection, incident_id: str, **values) -> None:
    conn.execute(_UPDATE_INCIDENT, {"k_id": incident_id, **values})


def dispose_engines() -> None:
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _readonly.clear()
