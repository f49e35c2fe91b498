"""The `cicd` command: run the self-healing control plane, onboard apps, break them, read the proof.

The commands live in cicd/cli/ (one module per group, the root in cicd/cli/main.py); this module is
the entry point setup.cfg's console script and `python -m cli` (how `cicd up` starts the watcher) name.
"""
from cicd.cli.main import main

if __name__ == "__main__":
    main()
