"""cicd-heal: the domain core. Plain Python; no module here imports Celery."""
__version__ = "0.1.0"
