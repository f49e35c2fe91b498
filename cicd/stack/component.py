"""One protocol for every component of the embedded stack, after Celery's bootsteps
(celery/worker/components.py): each kind of process is one class that says what it requires, and
`up`, `down`, the supervisor and `prepare` are walks over the components in dependency order
(stopping in reverse), instead of one long function per verb.

A component acts on the stack's record (Context.stack) under the stack lock: start and stop and
supervise change it, the walk writes it down. Per-environment components (workers, beat, watcher)
are walked once for each environment concerned, the others once for the stack.
"""
from __future__ import annotations

from typing import Callable, ClassVar, Iterable, Sequence

from cicd.config import Settings
from cicd.stack.record import Context, StackError


class Component:
    name: ClassVar[str]
    # Names of the components that must be running before this one starts (and still be running
    # when it stops): the walk starts them first and stops them after.
    requires: ClassVar[tuple[str, ...]] = ()
    # True: one of it per environment; False: one for the whole stack (all environments).
    per_env: ClassVar[bool] = False
    # False: if it cannot start, the rest of the stack still starts, and `up` reports it at the end.
    essential: ClassVar[bool] = True

    def prepare(self, settings: Settings) -> None:
        """What it needs on disk before any of the stack starts (`cicd up`, compose's bootstrap)."""

    def start(self, ctx: Context) -> None:
        """Start it unless it is running (`up` starts only what is missing). Under the stack lock:
        anything slow to answer is left to await_ready."""

    def await_ready(self, ctx: Context) -> None:
        """After the lock: return once what start began is up and answering, else StackError.
        Nothing to wait for unless a component says so: most starts wait for what they need."""

    def ready(self, ctx: Context) -> bool:
        """Is it up and answering (or, for what need not run, not wanted)?"""
        return True

    def stop(self, ctx: Context) -> int:
        """Stop what the record says it started; the number of processes stopped."""
        return 0

    def supervise(self, ctx: Context) -> None:
        """Restart it, as it was, if it died."""


def in_start_order(components: Sequence[Component]) -> list[Component]:
    """Every component after all it requires; otherwise in the order given. StackError for a
    requirement that is not there or a cycle."""
    by_name = {c.name: c for c in components}
    for component in components:
        missing = [r for r in component.requires if r not in by_name]
        if missing:
            raise StackError(f"{component.name} requires {', '.join(missing)}, which is not a component")
    ordered: list[Component] = []
    placed: set[str] = set()
    while len(ordered) < len(components):
        startable = [c for c in components if c.name not in placed and set(c.requires) <= placed]
        if not startable:
            cycle = sorted(c.name for c in components if c.name not in placed)
            raise StackError(f"the requirements of {', '.join(cycle)} go round in a cycle")
        ordered.append(startable[0])
        placed.add(startable[0].name)
    return ordered


def in_stop_order(components: Sequence[Component]) -> list[Component]:
    return in_start_order(components)[::-1]


def contexts(component: Component, ctx: Context, envs: Iterable[str], whole_stack: bool) -> list[Context]:
    """Where one step of a walk acts: each of envs for a per-environment component; the stack, if
    the walk concerns the whole stack, for the others."""
    if component.per_env:
        return [ctx.for_env(env) for env in envs]
    return [ctx] if whole_stack else []


def start_all(components: Sequence[Component], ctx: Context, envs: Iterable[str],
              record: Callable[[], None]) -> dict[str, StackError]:
    """Start each in order, recording the stack after each (so a later failure orphans nothing).
    Returns the errors of the inessential components that could not start, by name."""
    envs = list(envs)
    failed: dict[str, StackError] = {}
    for component in in_start_order(components):
        for where in contexts(component, ctx, envs, whole_stack=True):
            try:
                component.start(where)
            except StackError as exc:
                if component.essential:
                    raise
                failed[component.name] = exc
            finally:
                record()
    return failed


def await_all(components: Sequence[Component], ctx: Context, envs: Iterable[str], skip: Iterable[str] = ()) -> None:
    envs, skip = list(envs), set(skip)
    for component in in_start_order(components):
        if component.name not in skip:
            for where in contexts(component, ctx, envs, whole_stack=True):
                component.await_ready(where)


def stop_all(components: Sequence[Component], ctx: Context, envs: Iterable[str], whole_stack: bool) -> int:
    envs = list(envs)
    return sum(component.stop(where) for component in in_stop_order(components)
               for where in contexts(component, ctx, envs, whole_stack))


def supervise_all(components: Sequence[Component], ctx: Context, envs: Iterable[str]) -> None:
    envs = list(envs)
    for component in in_start_order(components):
        for where in contexts(component, ctx, envs, whole_stack=True):
            component.supervise(where)
