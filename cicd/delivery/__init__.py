"""Getting apps running: onboarding (validated input to a spec), fetching from git, deploys and
rollbacks with their health gate, the example apps, and faults injected on purpose."""
