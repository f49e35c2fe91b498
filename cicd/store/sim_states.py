"""The simulated fleet's shared state: one SimAppState row per app (its state as JSON), in the
database of the shared simulated runtime (cicd.runtime.sim.SharedSimRuntime), which every
worker process reads and edits. The runtime owns the transactions; these take its connection.

Core statements, prebuilt with bindparams: the runtime is called for every probe and action.
"""
from __future__ import annotations

from sqlalchemy import bindparam, select, update
from sqlalchemy.engine import Connection

from cicd.store import SimAppState

_STATES = SimAppState.__table__
_MINE = _STATES.c.env == bindparam("env")
_STATE = select(_STATES.c.state).where(_MINE, _STATES.c.app == bindparam("app"))
_STATE_FOR_UPDATE = select(_STATES.c.state).where(_MINE, _STATES.c.app == bindparam("app")).with_for_update()
_STATES_OF = select(_STATES.c.app, _STATES.c.state).where(_MINE, _STATES.c.app.in_(bindparam("apps", expanding=True)))
_ALL_STATES = select(_STATES.c.app, _STATES.c.state).where(_MINE)
_APPS = select(_STATES.c.app).where(_MINE)
# (an UPDATE's own columns may not name a WHERE parameter: hence k_env, k_app)
_SAVE = (update(_STATES).where(_STATES.c.env == bindparam("k_env"), _STATES.c.app == bindparam("k_app"))
         .values(state=bindparam("state")))

# Up to this many apps (a verification's few) are read by name; more (a probe cycle's: the
# whole fleet) by reading all of the environment's rows.
FEW_APPS = 500


def state_of(conn: Connection, env: str, app: str) -> dict | None:
    """The app's state, or None if it is not deployed."""
    return conn.execute(_STATE, {"env": env, "app": app}).scalar()


def state_for_update(conn: Connection, env: str, app: str) -> dict | None:
    """The app's state, locked for the rest of the transaction (None if it is not deployed)."""
    return conn.execute(_STATE_FOR_UPDATE, {"env": env, "app": app}).scalar()


def states_of(conn: Connection, env: str, apps: list[str]) -> dict[str, dict]:
    """app -> state, for those of `apps` that are deployed."""
    if len(apps) <= FEW_APPS:
        rows = conn.execute(_STATES_OF, {"env": env, "apps": list(apps)}).all()
    else:
        rows = conn.execute(_ALL_STATES, {"env": env}).all()
    wanted = set(apps)
    return {app: state for app, state in rows if app in wanted}


def app_names(conn: Connection, env: str) -> list[str]:
    """The deployed apps, in no particular order."""
    return conn.execute(_APPS, {"env": env}).scalars().all()


def save(conn: Connection, env: str, app: str, state: dict) -> None:
    """Replace the state of a deployed app."""
    conn.execute(_SAVE, {"k_env": env, "k_app": app, "state": state})


def add(conn: Connection, env: str, app: str, state: dict) -> None:
    """The state of a newly deployed app."""
    conn.execute(_STATES.insert(), {"env": env, "app": app, "state": state})


def remove(conn: Connection, env: str, app: str) -> None:
    """Forget a stopped app."""
    conn.execute(_STATES.delete().where(_STATES.c.env == env, _STATES.c.app == app))
