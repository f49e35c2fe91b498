"""The healing loop's steps: detect, decide, orchestrate (gate and act), verify, learn, reconcile,
and the approvals a human gives in between. Each step reads and writes through cicd.store and acts
through a Runtime; the Celery tasks in workers/ and the simulator (learning) call the same steps."""
