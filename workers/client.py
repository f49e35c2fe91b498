"""How commands talk to the agents: send a task to an environment's queue, wait for its answer."""
from __future__ import annotations

import uuid

from celery.exceptions import TimeoutError as CeleryTimeout

from cicd.stack import cluster
from cicd.config import Settings


class AgentUnavailable(cluster.StackError):
    pass


class ControlPlane:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._app = None
        self._broker_answered = False

    @property
    def app(self):
        if self._app is None:
            from .app import celery_app
            # The broker may have been started by this very command: read its address now.
            celery_app.conf.broker_url = celery_app.conf.result_backend = self.settings.broker_url
            self._app = celery_app
        return self._app

    def _sender(self):
        """The app, once the broker has answered: a command then says at once that the stack is
        down, where Celery would retry a dead broker for tens of seconds and end in a traceback.
        (`cicd watch` uses `app`, and keeps Celery's retries through a broker restart.)"""
        if not self._broker_answered:
            cluster.require_broker(self.settings)
            self._broker_answered = True
        return self.app

    def ping(self, nodes: list[str], timeout: float) -> set[str]:
        replies = self._sender().control.ping(destination=nodes, timeout=timeout) or []
        return {node for reply in replies for node in reply}

    def answering(self, timeout: float) -> set[str]:
        """Every worker on the broker that answers a broadcast ping within timeout, by node name."""
        replies = self._sender().control.ping(timeout=timeout) or []
        return {node for reply in replies for node in reply}

    def _call(self, task_name: str, agent: str, timeout: float, **kwargs) -> dict:
        result = self._sender().send_task(task_name, kwargs={**kwargs, "env": self.settings.env})
        try:
            return result.get(timeout=timeout, propagate=True)
        except CeleryTimeout:
            raise AgentUnavailable(f"the {agent} agent of {self.settings.env} did not answer within {timeout:.0f} s; "
                                   f"is the stack up? (`cicd status`, `cicd up --env {self.settings.env}`)") from None
        finally:
            result.forget()

    def onboard(self, name: str, repo: str, runtime: str, timeout: float = 60, host: str | None = None) -> dict:
        placement = {"place_on": host} if host else {}
        return self._call("cicd.onboard.register", "onboard", timeout, name=name, repo=repo, runtime=runtime,
                          **placement)

    def host_inject(self, host: str, app: str, kind: str, options: dict, timeout: float = 90) -> dict:
        """A fault on an app placed on a host, made there by the host's agent."""
        return self._call("cicd.host.inject", f"host {host}", timeout, app=app, kind=kind, options=options,
                          host=host)

    def deploy(self, app: str, ref: str = "HEAD", reason: str = "", kind: str = "deploy", sha: str | None = None,
               request_id: str | None = None) -> str:
        """Ask the deploy agent for a new release of ref (or exactly sha); returns the request id."""
        request_id = request_id or f"deploy/{uuid.uuid4().hex}"
        self._sender().send_task("cicd.deploy.release", kwargs={
            "app": app, "env": self.settings.env, "ref": ref, "sha": sha, "kind": kind, "request_id": request_id,
            "reason": reason})
        return request_id

    def resend(self, task: str, args: list, kwargs: dict, chain: list | None) -> None:
        """Send a dead letter again, with the rest of the chain it was part of."""
        self._sender().send_task(task, args=args, kwargs=kwargs, chain=chain or None)

    def require_broker(self) -> None:
        """StackDown within seconds if the broker does not answer (a send would retry for long)."""
        cluster.require_broker(self.settings)

    def run_approved(self, approval_id: str) -> None:
        """The rest of a held-back incident chain, now that a human approved its action."""
        self._sender()  # the broker answers, and is configured before the chain is built
        from .chains import approved_chain
        approved_chain(self.settings.env, approval_id).apply_async()

    def scale(self, app: str, replicas: int, timeout: float = 60) -> dict:
        return self._call("cicd.deploy.scale", "deploy", timeout, app=app, replicas=replicas,
                          request_id=uuid.uuid4().hex)
