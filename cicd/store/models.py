"""The tables: registry, releases, incidents, executions, approvals, policy, proof chain, probes.

Every table carries the environment, so one server may hold several environments without them
meeting. The status columns hold the values of cicd.core.lifecycle's enums.
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from cicd.core.events import utcnow


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
    # a lifecycle.ReleaseStatus: fetching, starting, switching, live, failed, superseded (was live,
    # replaced), rolled_back (was live, bad). While switching, detail says why it is being given up.
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


class PlacedReplicas(Base):
    """The replicas of an app placed on a host (its spec's "host"), as that host's agent last
    published them: where the monitor, elsewhere, probes them (address:port of each), and what
    the gates count. Written by the host agent after every change it makes to the app; an app
    without a row runs on the control plane's own machine."""
    __tablename__ = "placed_replicas"
    env: Mapped[str] = mapped_column(String(10), primary_key=True)
    app: Mapped[str] = mapped_column(String(40), primary_key=True)
    host: Mapped[str] = mapped_column(String(32))
    address: Mapped[str] = mapped_column(String(64))
    # [{slot, pid, ticks, port, release, started_at, health_path, memory_limit_mb}], the live ones
    replicas: Mapped[list] = mapped_column(JSON)
    live: Mapped[int | None] = mapped_column(Integer, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
