"""Fetching code over git: real repositories served over loopback HTTP (git's dumb protocol)."""
from __future__ import annotations

import io
import os
import tarfile

import pytest

from cicd.delivery import examples, gitsource
from cicd.runtime import process


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("git")
    examples.make_repo(root, "web-api", slow_delay_s=7)
    server = examples.start_server(root, root / "server.log")
    yield server["url"]
    process.stop(server["pid"], server["ticks"])


@pytest.mark.parametrize("ref", ["main", "HEAD", "v1.2.3", "release/2026-11", "cicd-inject/slow", "a" * 40])
def test_good_refs(ref):
    assert gitsource.check_ref(ref) == ref


@pytest.mark.parametrize("ref", ["", "-u", "--upload-pack=touch /tmp/x", "a..b", "main@{1}", "with space",
                                 "x" * 201, "main.lock", "dir/", None, 7, "$(id)", "`id`", "a;b"])
def test_refs_that_are_options_or_shell_or_ranges_are_refused(ref):
    with pytest.raises(gitsource.SourceError, match="ref"):
        gitsource.check_ref(ref)


def test_fetch_resolve_and_export_a_revision(served, tmp_path):
    mirror = tmp_path / "mirror.git"
    gitsource.fetch(f"{served}/web-api.git", mirror)
    main = gitsource.resolve(mirror, "main")
    slow = gitsource.resolve(mirror, "cicd-inject/slow")
    assert main != slow and len(main) == 40 and gitsource.resolve(mirror, "HEAD") == main
    assert gitsource.has_commit(mirror, slow) and not gitsource.has_commit(mirror, "0" * 40)
    gitsource.export(mirror, slow, tmp_path / "release")
    assert (tmp_path / "release" / "startup_delay_s").read_text().strip() == "7"
    assert (tmp_path / "release" / "server.py").exists() and not (tmp_path / "release" / ".git").exists()
    gitsource.fetch(f"{served}/web-api.git", mirror)  # a second fetch updates in place


def test_example_repositories_are_reproducible(tmp_path):
    a = examples.make_repo(tmp_path / "a", "same")
    b = examples.make_repo(tmp_path / "b", "same")
    assert gitsource.resolve(a, "main") == gitsource.resolve(b, "main")


def test_unknown_refs_and_commits_are_clear_errors(served, tmp_path):
    mirror = tmp_path / "mirror.git"
    gitsource.fetch(f"{served}/web-api.git", mirror)
    with pytest.raises(gitsource.SourceError, match="does not exist"):
        gitsource.resolve(mirror, "no-such-branch")
    with pytest.raises(gitsource.SourceError, match="not a full commit id"):
        gitsource.export(mirror, "main", tmp_path / "x")
    assert gitsource.remote_has(f"{served}/web-api.git", "cicd-inject/broken")
    assert not gitsource.remote_has(f"{served}/web-api.git", "nope")


def test_only_http_transports_are_allowed(served, tmp_path):
    # Onboarding refuses such URLs already; git itself refuses them too, whatever reaches it.
    local = examples.make_repo(tmp_path / "local", "x")
    for url in (f"file://{local}", str(local), "ext::sh -c touch% /tmp/pwned"):
        with pytest.raises(gitsource.SourceError):
            gitsource.fetch(url, tmp_path / f"m{abs(hash(url))}.git")


def test_a_missing_repository_is_a_clear_error(served, tmp_path):
    with pytest.raises(gitsource.SourceError, match="git clone failed"):
        gitsource.fetch(f"{served}/missing.git", tmp_path / "m.git")
    assert not (tmp_path / "m.git").exists()  # no half-made mirror left behind


def _tar_of(*members: tuple[str, str, str]) -> tarfile.TarFile:
    """An archive of (name, kind, data-or-link) members, read back for extraction."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size, info.mode = len(data), 0o4755  # a set-uid bit the extraction must drop
                tar.addfile(info, io.BytesIO(data.encode()))
            else:
                info.type = {"symlink": tarfile.SYMTYPE, "device": tarfile.CHRTYPE}[kind]
                info.linkname = data
                tar.addfile(info)
    buffer.seek(0)
    return tarfile.open(fileobj=buffer)


@pytest.mark.parametrize("members", [
    [("../escape.txt", "file", "x")],
    [("/etc/abs.txt", "file", "x")],
    [("link", "symlink", "/etc/passwd")],
    [("link", "symlink", "../../outside")],
    [("null", "device", "")],
])
def test_without_extraction_filters_an_archive_that_would_write_outside_is_refused(tmp_path, members):
    # What gitsource.export checks itself on Pythons older than 3.11.4 (Debian 12's 3.11.2).
    with _tar_of(*members) as tar, pytest.raises(gitsource.SourceError):
        gitsource._data_members(tar, tmp_path)


def test_without_extraction_filters_a_plain_tree_extracts_without_special_bits(tmp_path):
    with _tar_of(("app/server.py", "file", "print('hi')"), ("app/link", "symlink", "server.py")) as tar:
        tar.extractall(tmp_path, members=gitsource._data_members(tar, tmp_path))
    assert (tmp_path / "app" / "server.py").read_text() == "print('hi')"
    assert (tmp_path / "app" / "server.py").stat().st_mode & 0o7777 == 0o755
    assert os.readlink(tmp_path / "app" / "link") == "server.py"
