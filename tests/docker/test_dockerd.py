"""The tier's own daemon and base image work: a container runs Python and its exit code is kept."""
from __future__ import annotations

import os
import subprocess


def test_a_container_of_the_base_image_runs_python_and_its_exit_code_is_kept(dockerd):
    run = subprocess.run(["docker", "run", "--name", "smoke", "--network", "host", "--init", dockerd.base_image(),
                          "python3", "-c", "import sys; print('hello from', sys.version_info[:2]); sys.exit(3)"],
                         capture_output=True, text=True, env={**os.environ, **dockerd.env}, timeout=120)
    assert run.returncode == 3, run.stderr
    assert "hello from (3, 11)" in run.stdout
    assert dockerd.docker("inspect", "--format", "{{.State.ExitCode}}", "smoke").stdout.strip() == "3"
