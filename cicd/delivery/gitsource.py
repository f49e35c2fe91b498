"""Fetching an app's code: git over http(s) into a per-app mirror, then one revision exported.

Every git call is an argument list (never a shell), with prompts off and only the http and
https transports allowed, so neither a repo URL nor a ref can make git run anything else.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

GIT_TIMEOUT_S = 300
REF_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")


class SourceError(RuntimeError):
    """The code could not be fetched; the message says which step failed and why."""


def check_ref(ref) -> str:
    """A branch, tag or commit id: no leading '-' (an option to git), no '..', no '@{', no spaces."""
    if not isinstance(ref, str) or not REF_PATTERN.fullmatch(ref) or ".." in ref or ref.endswith((".lock", "/")):
        raise SourceError(f"ref {ref!r}: must be a branch, tag or commit id "
                          "(letters, digits, '.', '_', '-', '/'; not starting with '-', no '..')")
    return ref


def _git(args: list[str], timeout: float = GIT_TIMEOUT_S, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    verb = args[2] if args[0] == "--git-dir" else args[0]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/"),
           "LANG": "C", "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true", "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_PROTOCOL_FROM_USER": "0"}
    argv = ["git", "-c", "protocol.allow=never", "-c", "protocol.http.allow=always",
            "-c", "protocol.https.allow=always", "-c", "core.hooksPath=/dev/null", *args]
    try:
        out = subprocess.run(argv, stdout=stdout, stderr=subprocess.PIPE, env=env, timeout=timeout)
    except FileNotFoundError:
        raise SourceError("git is not installed (apt-get install git)") from None
    except subprocess.TimeoutExpired:
        raise SourceError(f"git {verb} took longer than {timeout:.0f} s") from None
    if out.returncode != 0:
        raise SourceError(f"git {verb} failed: {out.stderr.decode(errors='replace').strip()[-400:]}")
    return out


def fetch(repo_url: str, mirror: Path) -> None:
    """Create or update the mirror of the repository (all branches and tags)."""
    if (mirror / "HEAD").exists():
        _git(["--git-dir", str(mirror), "fetch", "--prune", "--quiet", "origin"])
        return
    mirror.parent.mkdir(parents=True, exist_ok=True)
    partial = mirror.with_name(mirror.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    _git(["clone", "--mirror", "--quiet", "--", repo_url, str(partial)])
    partial.rename(mirror)  # only a complete mirror ever has the final name


def has_commit(mirror: Path, sha: str) -> bool:
    if not (mirror / "HEAD").exists() or not re.fullmatch(r"[0-9a-f]{40}", sha or ""):
        return False
    try:
        _git(["--git-dir", str(mirror), "cat-file", "-e", f"{sha}^{{commit}}"])
        return True
    except SourceError:
        return False


def resolve(mirror: Path, ref: str) -> str:
    """The commit id a ref names in the mirror."""
    check_ref(ref)
    try:
        out = _git(["--git-dir", str(mirror), "rev-parse", "--verify", "--quiet", "--end-of-options",
                    f"{ref}^{{commit}}"])
    except SourceError:
        raise SourceError(f"ref {ref!r} does not exist in the repository") from None
    return out.stdout.decode().strip()


def export(mirror: Path, sha: str, dest: Path) -> None:
    """Write the tree of commit `sha` to dest (which must not exist yet); no .git inside."""
    if not re.fullmatch(r"[0-9a-f]{40}", sha):
        raise SourceError(f"commit {sha!r}: not a full commit id")
    archive = _git(["--git-dir", str(mirror), "archive", "--format=tar", sha]).stdout
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")  # refuses absolute paths, '..' and device files
        else:
            # Pythons without extraction filters (PEP 706: 3.11.4 and later have them; Debian 12's
            # python3 is 3.11.2): the same refusals, checked here before anything is written.
            tar.extractall(dest, members=_data_members(tar, dest))


def _data_members(tar: tarfile.TarFile, dest: Path) -> list[tarfile.TarInfo]:
    """The archive's members if each is what the "data" filter lets through: regular files,
    directories and symlinks, all inside dest (no absolute name, no '..' out, no link out), without
    set-uid, set-gid or sticky bits; else SourceError naming the first one that is not."""
    root = dest.resolve()
    members = tar.getmembers()
    for member in members:
        target = (root / member.name).resolve()
        if os.path.isabs(member.name) or not target.is_relative_to(root):
            raise SourceError(f"the archive's {member.name!r} would land outside the release")
        if not (member.isfile() or member.isdir() or member.issym()):
            raise SourceError(f"the archive's {member.name!r} is not a regular file, directory or symlink")
        if member.issym():
            link = (target.parent / member.linkname).resolve()
            if os.path.isabs(member.linkname) or not link.is_relative_to(root):
                raise SourceError(f"the archive's symlink {member.name!r} points outside the release")
        member.mode &= 0o777
        member.uid = member.gid = 0
        member.uname = member.gname = ""
    return members


def remote_has(repo_url: str, ref: str) -> bool:
    """Whether the remote repository has a branch or tag named ref (without fetching it)."""
    check_ref(ref)
    out = _git(["ls-remote", "--heads", "--tags", "--", repo_url, ref], timeout=60)
    return bool(out.stdout.strip())
