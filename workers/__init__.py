"""The Celery layer: one module per agent queue, thin tasks that call into cicd/."""
