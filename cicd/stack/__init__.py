"""The embedded stack that `cicd up` runs on one machine (Redis, the agents' workers, beat, Flower,
the exit watcher, the git server, the supervisor), and the end-to-end demo that drives it."""
