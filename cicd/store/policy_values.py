"""The Q-table's rows: what each environment has learned per state and action (a pair without a
row still has its prior, which the policy knows and the store does not).

The healing chain reads and learns through Core statements, built once (every decision checks
whether anything was learned; `make bench`); a training run writes through the ORM. Each
function works inside the caller's transaction, an ORM session or a Core connection.
"""
from __future__ import annotations

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from cicd.store.db import connection_of
from cicd.store.models import PolicyValue

# Either way into a transaction: the chain's Core connection, or a command's ORM session.
Transaction = Session | Connection

_POLICY = PolicyValue.__table__
_LEARNED_SO_FAR = (select(func.count(), func.max(_POLICY.c.updated_at), func.sum(_POLICY.c.updates))
                   .where(_POLICY.c.env == bindparam("env")))
_VALUE = (select(_POLICY.c.q, _POLICY.c.updates)
          .where(_POLICY.c.env == bindparam("env"), _POLICY.c.state == bindparam("state"),
                 _POLICY.c.action == bindparam("action")).with_for_update())
_NEW_VALUE = insert(_POLICY)
_SET_VALUE = (update(_POLICY).where(_POLICY.c.env == bindparam("k_env"), _POLICY.c.state == bindparam("k_state"),
                                    _POLICY.c.action == bindparam("k_action"))
              .values(q=bindparam("q"), updates=bindparam("updates"), updated_at=bindparam("updated_at")))


def version(tx: Transaction, env: str) -> tuple:
    """Which database and how much has been learned in env there: changes whenever a value is
    learned, so a table built from the rows can be kept until it does (one small query)."""
    conn = connection_of(tx)
    learned = conn.execute(_LEARNED_SO_FAR, {"env": env}).one()
    return conn.engine.url.render_as_string(hide_password=True), tuple(learned)


def learned(tx: Transaction, env: str) -> list:
    """Every learned value of env: rows of (state, action, q)."""
    conn = connection_of(tx)
    return conn.execute(select(_POLICY.c.state, _POLICY.c.action, _POLICY.c.q).where(_POLICY.c.env == env)).all()


def locked_value(tx: Transaction, env: str, state: str, action: str):
    """The learned (q, updates) of one state-action, row-locked for the update that follows; None
    if nothing was learned for it yet."""
    return connection_of(tx).execute(_VALUE, {"env": env, "state": state, "action": action}).first()


def save_learned(tx: Transaction, env: str, state: str, action: str, q: float, updated_at, previous) -> None:
    """Store one learned update of a state-action: a new row if `previous` (its locked_value) was
    None, else that row with one update more."""
    conn = connection_of(tx)
    if previous is None:
        conn.execute(_NEW_VALUE, {"env": env, "state": state, "action": action, "q": q, "updates": 1,
                                  "updated_at": updated_at})
    else:
        conn.execute(_SET_VALUE, {"k_env": env, "k_state": state, "k_action": action, "q": q,
                                  "updates": previous.updates + 1, "updated_at": updated_at})


def forget(session: Session, env: str) -> None:
    """Delete everything env has learned: its table is the priors again."""
    session.execute(delete(PolicyValue).where(PolicyValue.env == env))


def save_trained(session: Session, env: str, state: str, action: str, q: float, visits: int, updated_at) -> None:
    """Store what a training run made of one state-action: its value, and `visits` updates more."""
    row = session.get(PolicyValue, (env, state, action), with_for_update=True)
    if row is None:
        row = PolicyValue(env=env, state=state, action=action, q=0.0, updates=0)
        session.add(row)
    row.q, row.updates, row.updated_at = q, row.updates + visits, updated_at
