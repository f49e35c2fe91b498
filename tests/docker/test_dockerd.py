"""The tier's own daemon and base image work: a container runs Python and its exit code is kept."""
from __future__ import annotations

import os
import signal
import subprocess
import time


def test_a_container_of_the_base_image_runs_python_and_its_exit_code_is_kept(dockerd):
    run = subprocess.run(["docker", "run", "--name", "smoke", "--network", "host", "--init", dockerd.base_image(),
                          "python3", "-c", "import sys; print('hello from', sys.version_info[:2]); sys.exit(3)"],
                         capture_output=True, text=True, env={**os.environ, **dockerd.env}, timeout=120)
    assert run.returncode == 3, run.stderr
    assert "hello from (3, 11)" in run.stdout
    assert dockerd.docker("inspect", "--format", "{{.State.ExitCode}}", "smoke").stdout.strip() == "3"


def test_docker_kill_is_a_manual_stop_but_a_sigkill_of_the_main_process_is_restarted(dockerd):
    """What the compose tier relies on: restart policies answer a process that dies, and this
    daemon takes `docker kill` for a stop by hand, which they leave alone."""
    def state(name):
        return dockerd.docker("inspect", "--format", "{{.State.Status}} {{.State.Pid}} {{.RestartCount}}",
                              name).stdout.split()

    def wait_for(name, predicate, within_s=30.0):
        deadline, seen = time.monotonic() + within_s, None
        while time.monotonic() < deadline:
            seen = state(name)
            if predicate(seen):
                return seen
            time.sleep(0.1)
        raise AssertionError(f"{name}: last seen {seen}")

    for name in ("by-docker-kill", "by-sigkill"):
        dockerd.docker("run", "-d", "--name", name, "--network", "host", "--restart", "unless-stopped",
                       dockerd.base_image(), "sleep", "600")
        wait_for(name, lambda s: s[0] == "running" and s[1] != "0")
    dockerd.docker("kill", "by-docker-kill")
    wait_for("by-docker-kill", lambda s: s[0] == "exited")
    old_pid = int(state("by-sigkill")[1])
    os.kill(old_pid, signal.SIGKILL)
    restarted = wait_for("by-sigkill", lambda s: s[0] == "running" and s[1] not in ("0", str(old_pid)))
    assert restarted[2] == "1"
    # Given the time the restart took, the one stopped by hand would have been restarted too.
    assert state("by-docker-kill")[0] == "exited" and state("by-docker-kill")[2] == "0"
    dockerd.docker("rm", "-f", "by-docker-kill", "by-sigkill")
