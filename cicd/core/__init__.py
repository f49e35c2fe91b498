"""The domain, pure: events and schemas, the lifecycle, gates, the action catalogue, signing and
the clock. No SQL, no Celery, no I/O: everything here is a function of its arguments."""
