"""What beat sends, and how often. Every entry expires: a probe that could not start on time is
dropped, not queued behind the next one (stale probes would report a past state)."""


HOUSEKEEPING_S = 2.0


def build(settings) -> dict:
    interval = settings.probe_interval_s
    return {
        f"{settings.env}-housekeeping": {
            # Restarts whose backoff is over go on; approvals nobody answered in time expire.
            "task": "cicd.monitor.housekeeping",
            "schedule": HOUSEKEEPING_S,
            "kwargs": {"env": settings.env},
            "options": {"queue": settings.queue("monitor"), "expires": HOUSEKEEPING_S},
        },
        f"{settings.env}-probe-apps": {
            # One batched task per cycle probes every replica of every app (uptime and health).
            "task": "cicd.monitor.probe_all",
            "schedule": interval,
            "kwargs": {"env": settings.env},
            "options": {"queue": settings.queue("monitor"), "expires": interval},
        },
    }
