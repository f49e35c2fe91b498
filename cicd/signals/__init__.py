"""Sources that become Signals for the detector: the beat-scheduled probes and the exit watcher."""
