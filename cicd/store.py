"""SQLAlchemy models and sessions: registry, releases, incidents, executions, policy, proof chain.

SQLite (WAL) under var/ENV/ by default, PostgreSQL by CICD_DATABASE_URL. Every table carries
the environment, so one server may hold several environments without them meeting.

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
from datetime import datetime
from typing import Iterator

from sqlalchemy import (JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text,
                        UniqueConstraint, bindparam, create_engine, event, select, update)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .config import ConfigError, Settings
from .events import utcnow


class Base(DeclarativeBase):
    pass


class App(Base):
    """An onboarded app in one environment, with the spec generated from its runtime template."""
    __tablename__ = "apps"
    __table_args__ = (UniqueConstraint("env", "name", name="uq_app_env_name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    env: Mapped[str] = mapped_column(String(10))
    name: Mapped[str] = mapped_column(String(40))
    runtime: Mapped[str] = mapped_column(String(20))
    repo: Mapped[str] = mapped_column(String(500))
    spec: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Set when an incident ended without recovery; cleared by the monitor once the app is healthy.
    attention: Mapped[str | None] = mapped_column(String(200), nullable=True)


class Release(Base):
    __tablename__ = "releases"
    __table_args__ = (UniqueConstraint("env", "app", "number", name="uq_release"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    env: Mapped[str] = mapped_column(String(10))
    app: Mapped[str] = mapped_column(String(40))
    number: Mapped[int] = mapped_column(Integer)
    # fetching, starting, live, failed, superseded (was live, replaced), rolled_back (was live, bad)
    status: Mapped[str] = mapped_column(String(20))
    kind: Mapped[str] = mapped_column(String(20), default="deploy")  # deploy, retry, rollback, promotion
    ref: Mapped[str] = mapped_column(String(200), default="HEAD")
    sha: Mapped[str | None] = mapped_column(String(40), nullable=True)
    replicas: Mapped[int] = mapped_column(Integer)
    slow_signalled: Mapped[bool] = mapped_column(Boolean, default=False)
    # Who asked for it: a redelivered deploy task finds its release instead of making another.
    request_id: Mapped[str] = mapped_column(String(80), unique=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="")


class DeployLock(Base):
    """One deploy per app at a time. A lease, not a process lock: if the worker holding it dies,
    the lease runs out and the next deploy may go ahead."""
    __tablename__ = "deploy_locks"
    env: Mapped[str] = mapped_column(String(10), primary_key=True)
    app: Mapped[str] = mapped_column(String(40), primary_key=True)
    holder: Mapped[str] = mapped_column(String(80))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Incident(Base):
    __tablename__ = "incidents"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    env: Mapped[str] = mapped_column(String(10))
    app: Mapped[str] = mapped_column(String(40))
    kind: Mapped[str] = mapped_column(String(20))
    severity: Mapped[str] = mapped_column(String(10))
    status: Mapped[str] = mapped_column(String(12))  # open, stable, escalated, refused
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    slot: Mapped[int] = mapped_column(Integer, default=0)
    signal: Mapped[dict] = mapped_column(JSON)
    opened_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    resolution: Mapped[str] = mapped_column(Text, default="")
    # What the detector knew besides the signal: the live release, whether it is fresh, the last
    # good release to roll back to. The policy's state and the deploy actions' params use it.
    context: Mapped[dict] = mapped_column(JSON, default=dict)
    # The signed decision of the current attempt: a redelivered decide task returns it unchanged.
    decision: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    # "env/app" while the incident is open, NULL once closed: the unique constraint makes
    # "one open incident per app" hold even when two detectors race on the same signal.
    open_key: Mapped[str | None] = mapped_column(String(60), unique=True, nullable=True)


class Execution(Base):
    """One attempt to act on an incident. (incident_id, attempt) is the idempotency key."""
    __tablename__ = "executions"
    __table_args__ = (UniqueConstraint("incident_id", "attempt", name="uq_execution_key"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    env: Mapped[str] = mapped_column(String(10))
    app: Mapped[str] = mapped_column(String(40))
    incident_id: Mapped[str] = mapped_column(String(40), ForeignKey("incidents.id"))
    attempt: Mapped[int] = mapped_column(Integer)
    action: Mapped[str] = mapped_column(String(80))
    params: Mapped[dict] = mapped_column(JSON)
    # started, deferred, awaiting_approval, done, failed, refused (PostgreSQL enforces the width)
    status: Mapped[str] = mapped_column(String(20))
    gate: Mapped[str] = mapped_column(String(20), default="")
    reason: Mapped[str] = mapped_column(Text, default="")
    nonce: Mapped[str] = mapped_column(String(64), default="")
    result: Mapped[dict] = mapped_column(JSON, default=dict)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Approval(Base):
    """A human decision waited for: a promotion into this environment, or an action in it.

    The id names the environment (apr-prod-1a2b3c4d), so `cicd approve ID` finds its database."""
    __tablename__ = "approvals"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    env: Mapped[str] = mapped_column(String(10))
    kind: Mapped[str] = mapped_column(String(20))          # promotion, action
    app: Mapped[str] = mapped_column(String(40))
    incident_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    attempt: Mapped[int | None] = mapped_column(Integer, nullable=True)
    payload: Mapped[dict] = mapped_column(JSON)
    summary: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(12))        # pending, granted, denied, expired
    requested_by: Mapped[str] = mapped_column(String(80))
    requested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    decided_by: Mapped[str | None] = mapped_column(String(80), nullable=True)
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")


class PolicyValue(Base):
    """A learned Q-value; a state-action pair without a row still has its prior."""
    __tablename__ = "policy_values"
    env: Mapped[str] = mapped_column(String(10), primary_key=True)
    state: Mapped[str] = mapped_column(String(80), primary_key=True)
    action: Mapped[str] = mapped_column(String(40), primary_key=True)
    q: Mapped[float] = mapped_column(Float)
    updates: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ProofRecord(Base):
    __tablename__ = "proof_records"
    env: Mapped[str] = mapped_column(String(10), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    ts: Mapped[str] = mapped_column(String(32))
    event_name: Mapped[str] = mapped_column(String(40))
    incident_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    app: Mapped[str | None] = mapped_column(String(40), nullable=True)
    # Kept as the exact canonical text that was hashed, so verification never depends on how a
    # database re-serialises JSON.
    payload: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class ProofHead(Base):
    """The chain's last seq and hash: appends lock this row, and a truncated tail shows here."""
    __tablename__ = "proof_heads"
    env: Mapped[str] = mapped_column(String(10), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, default=0)
    hash: Mapped[str] = mapped_column(String(64))


class ReplicaHealth(Base):
    """What the probes have seen of one replica lately: the detector's memory between probes."""
    __tablename__ = "replica_health"
    env: Mapped[str] = mapped_column(String(10), primary_key=True)
    app: Mapped[str] = mapped_column(String(40), primary_key=True)
    slot: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    last_status: Mapped[str] = mapped_column(String(20), default="unknown")
    last_utilization: Mapped[float] = mapped_column(Float, default=0.0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AppHealth(Base):
    """Per app: uptime counters for `cicd status`, and the overload/idle streaks for the detector."""
    __tablename__ = "app_health"
    env: Mapped[str] = mapped_column(String(10), primary_key=True)
    app: Mapped[str] = mapped_column(String(40), primary_key=True)
    probes: Mapped[int] = mapped_column(Integer, default=0)
    up_probes: Mapped[int] = mapped_column(Integer, default=0)
    healthy_replicas: Mapped[int] = mapped_column(Integer, default=0)
    replicas: Mapped[int] = mapped_column(Integer, default=0)
    utilization: Mapped[float] = mapped_column(Float, default=0.0)
    consecutive_hot: Mapped[int] = mapped_column(Integer, default=0)
    consecutive_cold: Mapped[int] = mapped_column(Integer, default=0)
    last_probe_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class SimAppState(Base):
    """An app of the simulated fleet, when worker processes share it (CICD_RUNTIME=sim)."""
    __tablename__ = "sim_apps"
    env: Mapped[str] = mapped_column(String(10), primary_key=True)
    app: Mapped[str] = mapped_column(String(40), primary_key=True)
    state: Mapped[dict] = mapped_column(JSON)


class DeadLetter(Base):
    """A task that could not be processed, kept whole with the reason: never dropped silently.

    Whole means enough to send it again: the task's name, its arguments and the rest of the
    chain it was part of (`cicd dlq retry`)."""
    __tablename__ = "dead_letters"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    env: Mapped[str] = mapped_column(String(10))
    task: Mapped[str] = mapped_column(String(80))
    args: Mapped[list] = mapped_column(JSON)
    kwargs: Mapped[dict] = mapped_column(JSON)
    chain: Mapped[list | None] = mapped_column(JSON, nullable=True)
    reason: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(10), default="kept")  # kept, retried
    retries: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    retried_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


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
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
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
                os.makedirs(os.path.dirname(url[len("sqlite:///"):]) or ".", exist_ok=True)
                engine = _sqlite_engine(url)
            elif url.startswith("postgresql"):
                engine = _postgresql_engine(url)
            else:
                raise ConfigError(f"CICD_DATABASE_URL: {make_url(url).drivername!r} is not supported: "
                                  "use sqlite:///PATH or postgresql+psycopg2://USER@HOST/DB")
            _create_schema(engine, url)
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
            conn.info[PROOF_PENDING] = pending
            try:
                yield conn
            finally:
                conn.info.pop(PROOF_PENDING, None)
    if pending:
        from .proof import sync_mirror
        sync_mirror(settings, pending)


@event.listens_for(Session, "after_rollback")
def _forget_rolled_back_records(session: Session) -> None:
    # A record rolled back must neither reach the mirror nor serve as the chain's head.
    session.info.pop(PROOF_PENDING, None)


@contextlib.contextmanager
def session_scope(settings: Settings, readonly: bool = False) -> Iterator[Session]:
    """A transaction: commit on success, roll back on any error, then write the proof mirror.

    readonly: for reads only; it neither waits for nor blocks the writers (and on PostgreSQL a
    write in it fails)."""
    session = Session(bind=_engine(settings, readonly), expire_on_commit=False)
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
        from .proof import sync_mirror
        sync_mirror(settings, appended)


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
