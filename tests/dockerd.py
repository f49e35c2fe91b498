"""A throwaway Docker daemon for the tests, and a base image made here, since no registry is
reachable: dockerd with its own data root, exec root and socket under a temporary directory,
no iptables and no bridge (containers use the host's network), stopped and deleted at the end.

The base image is a minimal Debian (python3, its venv module, tini, CA certificates) made by
mmdebstrap from the Debian archive and imported with `docker import`; the tarball is cached under
~/.cache/cicd-heal, so only the first run on a machine pays for it (about 25 s).

Needs root (dockerd does), dockerd and mmdebstrap (`.ci/install-test-tools` installs docker.io and
mmdebstrap); where any is missing, `Unavailable` says what, and the Docker tests skip with it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

BASE_PACKAGES = ("python3", "python3-venv", "tini", "ca-certificates")
BASE_IMAGE = "cicd-test-base:bookworm"
INSTALL_HINT = "apt-get install docker.io mmdebstrap (as root)"
READY_WITHIN_S = 30.0
LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")


class Unavailable(Exception):
    """Why no daemon or base image can be had here; the Docker tests skip with this reason."""


def _run(argv: list[str], what: str, timeout: float, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, **kw)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"{what}: {exc}") from None
    if done.returncode != 0:
        raise Unavailable(f"{what} failed (exit {done.returncode}): {(done.stderr or done.stdout)[-600:]}")
    return done


class Dockerd:
    def __init__(self) -> None:
        if os.geteuid() != 0:
            raise Unavailable("dockerd needs root; these tests run as a normal user")
        for tool in ("dockerd", "containerd", "docker"):
            if shutil.which(tool) is None:
                raise Unavailable(f"{tool} is not installed: {INSTALL_HINT}")
        # Short paths: the daemon's sockets live under them, and a Unix socket path has 108 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="cicd-dk-", dir="/tmp"))
        self.socket = self.root / "docker.sock"
        self.host = f"unix://{self.socket}"
        self.log = self.root / "dockerd.log"
        self.process: subprocess.Popen | None = None

    @property
    def env(self) -> dict:
        """What a client of this daemon needs in its environment."""
        return {"DOCKER_HOST": self.host}

    def docker(self, *args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        return _run(["docker", *args], f"docker {' '.join(args[:2])}", timeout, env={**os.environ, **self.env}, **kw)

    def start(self) -> "Dockerd":
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                ["dockerd", "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
                 "--host", self.host, "--pidfile", str(self.root / "docker.pid"),
                 "--iptables=false", "--ip6tables=false", "--bridge=none", "--log-level=warn"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + READY_WITHIN_S
        while True:
            if self.process.poll() is not None:
                raise Unavailable(f"dockerd exited ({self.process.returncode}): {self.log.read_text()[-800:]}")
            probe = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True,
                                   text=True, env={**os.environ, **self.env})
            if probe.returncode == 0:
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise Unavailable(f"dockerd did not answer within {READY_WITHIN_S:.0f} s: "
                                  f"{self.log.read_text()[-800:]}")
            time.sleep(0.1)

    def base_image(self) -> str:
        """The base image, imported into this daemon (made first if this machine has none cached)."""
        if subprocess.run(["docker", "image", "inspect", BASE_IMAGE], capture_output=True,
                          env={**os.environ, **self.env}).returncode == 0:
            return BASE_IMAGE
        tarball = base_tarball()
        certs = sorted(LOCAL_CA_DIR.glob("*.crt"))
        if not certs:
            self.docker("import", "--change", 'CMD ["/bin/sh"]', str(tarball), BASE_IMAGE, timeout=300)
            return BASE_IMAGE
        # This machine's own certificate authorities (a TLS-inspecting egress proxy signs what pip
        # fetches with one): a base made here trusts what this machine trusts, or no build in it
        # could reach PyPI. pip's own bundle (certifi) ignores the system's, hence PIP_CERT.
        self.docker("import", "--change", 'CMD ["/bin/sh"]', str(tarball), BASE_IMAGE + "-imported", timeout=300)
        with tempfile.TemporaryDirectory(prefix="cicd-base-") as context:
            for cert in certs:
                shutil.copy(cert, context)
            Path(context, "Dockerfile").write_text(
                f"FROM {BASE_IMAGE}-imported\n"
                "COPY *.crt /usr/local/share/ca-certificates/\n"
                "RUN update-ca-certificates >/dev/null\n"
                "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt\n")
            self.docker("build", "-q", "-t", BASE_IMAGE, context, timeout=300)
        return BASE_IMAGE

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            # Its containers first (each gets SIGKILL: nothing in them needs a grace), then dockerd.
            ids = subprocess.run(["docker", "ps", "-aq"], capture_output=True, text=True,
                                 env={**os.environ, **self.env}).stdout.split()
            if ids:
                subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, env={**os.environ, **self.env},
                               timeout=120)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        # Left-over mounts of the overlay driver keep rm from deleting the data root.
        subprocess.run(["sh", "-c", f"grep -o ' {self.root}[^ ]*' /proc/mounts | sort -r | xargs -r -n1 umount -l"],
                       capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def base_tarball() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cicd-heal"
    key = hashlib.sha256(",".join(BASE_PACKAGES).encode()).hexdigest()[:12]
    tarball = cache / f"base-bookworm-{key}.tar"
    if tarball.exists():
        return tarball
    if shutil.which("mmdebstrap") is None:
        raise Unavailable(f"mmdebstrap is not installed (it makes the base image): {INSTALL_HINT}")
    cache.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_suffix(f".partial{os.getpid()}")
    _run(["mmdebstrap", "--variant=apt", "--include=" + ",".join(BASE_PACKAGES), "bookworm", str(partial)],
         "mmdebstrap (the base image, from the Debian archive)", timeout=600)
    partial.replace(tarball)
    return tarball
