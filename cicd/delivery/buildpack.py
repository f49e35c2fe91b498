"""Build plans that follow the buildpack conventions (Heroku, Dokku, Cloud Native Buildpacks).

Pure: the only I/O is reading the files each convention names in a release directory, and
looking up which Python interpreters exist on this machine. Nothing is inferred from the app's
code beyond those files:

  Procfile          `web: COMMAND` is the start command, `release: COMMAND` runs once per release
                    before the health gate (its failure fails the release); other process types
                    are ignored. A command runs without a shell: it is split into arguments the
                    way a shell would (shlex), and `$PORT` / `${PORT}` are replaced by the
                    replica's port when it starts. Anything that needs a shell (pipes, `&&`,
                    `;`, redirections, backticks, other variables, `VAR=value` prefixes) is
                    refused, naming the line. No Procfile: the default WSGI start below, else
                    the template's documented start.
  requirements.txt  dependencies, installed into a virtualenv of the release (`pip install -r`);
  pyproject.toml    otherwise the project itself (`pip install .`).
  manage.py         a Django app: `manage.py collectstatic --noinput` when Django is installed
                    (the app setting DISABLE_COLLECTSTATIC=1 skips it, as on Heroku).
  .python-version   the interpreter (`3.12`, `3.12.1`), else
  runtime.txt       (`python-3.12.1`); it must exist on this machine as python3.12, or the
                    build fails naming the file and the interpreters that are installed.
  cicd.toml         the optional manifest, below.

The Node toolchain, for the frontend and fullstack templates (the backend template is Python
only: a package.json there is noted and left alone):

  package.json      a JSON object; its dependencies are installed into the release's
                    node_modules with `npm ci` when package-lock.json (or npm-shrinkwrap.json)
  package-lock.json is there, `npm install` otherwise; `npm run build` when its scripts define
                    `build`. Without a Procfile web: line, replicas start with `npm start` (which
                    runs scripts.start); the frontend template requires one of the two, naming
                    package.json when neither is there, the fullstack template falls back to its
                    documented Python start (Node then only builds, the Python app serves).
  fullstack         both toolchains: the Node install and build first (so the Python app can
                    serve or collect what it built), then the Python steps above.

The default WSGI start, without a Procfile web: line (Python templates; the files Azure App
Service's Oryx build looks for, in its order), served by gunicorn from the release's virtualenv
(so gunicorn belongs in requirements.txt), bound to loopback on $PORT:

  manage.py + PKG/wsgi.py   a Django project: `gunicorn PKG.wsgi` (PKG: the one package beside
                            manage.py with a wsgi.py and a settings.py)
  application.py, app.py    `gunicorn application:app` / `gunicorn app:app`
  wsgi.py                   `gunicorn wsgi` (its `application`)

A repo with server.py and none of those keeps the template's start (the sample service's).

The manifest, cicd.toml (TOML; every key is optional, an unknown one is refused):

    [health]
    path = "/healthz"      # what the probes GET; any status below 400 is healthy

    [resources]
    memory_limit_mb = 1024 # per replica, for leak detection (whole MB, 32-65536); else the spec's

The health path is the manifest's, else "/" for an app that brings its own start command (a
Procfile, or package.json's start script), else the template's (`health_path` in the spec:
"/health" for the sample service).
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cicd.delivery.onboarding import DEFAULT_MEMORY_LIMIT_MB, check_memory_limit
from cicd.errors import CicdError

PROCFILE = "Procfile"
MANIFEST = "cicd.toml"
MANIFEST_KEYS = {"health": {"path"}, "resources": {"memory_limit_mb"}}
DEFAULT_HEALTH_PATH = "/"
PROCESS_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
PORT_REFERENCE = re.compile(r"\$(?:PORT\b|\{PORT\})")
VERSION_FILES = (".python-version", "runtime.txt")
# What a shell would interpret: without one, these would reach the program as literal text.
SHELL_OPERATORS = set("|&;<>()")
PACKAGE_JSON = "package.json"
NODE_LOCKFILES = ("npm-shrinkwrap.json", "package-lock.json")   # npm ci honours either; shrinkwrap wins
# Which templates build with which toolchains; Python is always there (the sample service and any
# Procfile command such as `python -m http.server` run from the release's virtualenv).
NODE_TEMPLATES = {"frontend", "fullstack"}
NPM_START = ["npm", "start"]
# The default WSGI start: module file -> gunicorn's app argument (Oryx's order); Django first.
WSGI_MODULES = (("application.py", "application:app"), ("app.py", "app:app"), ("wsgi.py", "wsgi"))
GUNICORN = ["gunicorn", "--bind", "127.0.0.1:$PORT"]


class BuildpackError(CicdError, ValueError):
    """A release's convention files cannot be followed; the message names the file and the rule."""


@dataclass(frozen=True)
class BuildPlan:
    """How to build and run one release. Argument lists keep `$PORT` for start time."""
    python: str                          # the interpreter the release's virtualenv is made from
    python_from: str | None = None       # the file that asked for it, if any
    install: list[str] | None = None     # pip arguments after `install`, or None: nothing to install
    collectstatic: bool = False          # manage.py exists: Django's collectstatic if Django is there
    web: list[str] | None = None         # the Procfile's start, else `npm start`, or None: the template's
    release: list[str] | None = None     # the Procfile's release command
    health_path: str | None = None       # None: the template's (the spec's), else "/"
    memory_limit_mb: int | None = None   # the manifest's; None: the spec's
    npm_install: list[str] | None = None # npm arguments: ["ci"] or ["install"]; None: no Node toolchain
    npm_build: bool = False              # package.json's scripts define build: `npm run build`
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _read(directory: Path, name: str) -> str | None:
    path = directory / name
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BuildpackError(f"{name}: must be UTF-8 text") from None


def parse_command(text: str, where: str) -> list[str]:
    """A Procfile command as arguments, refusing whatever only a shell could run."""
    def refuse(why: str):
        raise BuildpackError(f"{where}: {why}; commands run without a shell, so write one program and "
                             f"its arguments, with $PORT as the only variable")
    if "`" in text:
        refuse("backticks need a shell")
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError as exc:
        refuse(f"cannot be split into arguments ({exc})")
    if not tokens:
        refuse("the command is empty")
    for token in tokens:
        if set(token) <= SHELL_OPERATORS:
            refuse(f"{token!r} needs a shell")
        if "$" in PORT_REFERENCE.sub("", token):
            refuse(f"{token!r}: only $PORT or ${{PORT}} is expanded")
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):
        refuse(f"{tokens[0]!r}: a VAR=value prefix needs a shell (set app settings instead)")
    return tokens


def parse_procfile(text: str) -> dict[str, list[str]]:
    """{process type: argv}; every refusal names the line."""
    processes: dict[str, list[str]] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{PROCFILE} line {number} ({line[:80]})"
        name, colon, command = line.partition(":")
        name = name.strip()
        if not colon or not PROCESS_TYPE.fullmatch(name):
            raise BuildpackError(f"{where}: must be 'TYPE: COMMAND', like 'web: gunicorn app:app'")
        if name in processes:
            raise BuildpackError(f"{where}: {name!r} is defined twice")
        processes[name] = parse_command(command.strip(), where)
    return processes


def expand_port(argv: list[str], port: int) -> list[str]:
    """The start command for one replica: $PORT and ${PORT} become its port, inside any argument."""
    return [PORT_REFERENCE.sub(str(port), arg) for arg in argv]


def parse_manifest(text: str) -> dict:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BuildpackError(f"{MANIFEST}: not valid TOML ({exc})") from None
    for table, value in data.items():
        if table not in MANIFEST_KEYS:
            raise BuildpackError(f"{MANIFEST}: unknown key {table!r} (known: {', '.join(sorted(MANIFEST_KEYS))})")
        if not isinstance(value, dict):
            raise BuildpackError(f"{MANIFEST}: {table!r} must be a table, like [{table}]")
        for key in value:
            if key not in MANIFEST_KEYS[table]:
                raise BuildpackError(f"{MANIFEST}: unknown key '{table}.{key}' "
                                     f"(known: {', '.join(sorted(MANIFEST_KEYS[table]))})")
    path = data.get("health", {}).get("path")
    if path is not None and (not isinstance(path, str) or not re.fullmatch(r"/[\x21-\x7e]{0,500}", path)):
        raise BuildpackError(f"{MANIFEST}: health.path must be a string starting with '/', without spaces")
    if "memory_limit_mb" in data.get("resources", {}):
        for refusal in check_memory_limit(data["resources"]["memory_limit_mb"]):
            raise BuildpackError(f"{MANIFEST}: resources.{refusal.field} {refusal.message}")
    return data


def parse_python_version(text: str, name: str) -> tuple[int, int]:
    """(major, minor) from `3.12`, `3.12.1` (.python-version) or `python-3.12.1` (runtime.txt)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    value = lines[0] if lines else ""
    pattern = r"python-(\d+)\.(\d+)(?:\.\d+)?" if name == "runtime.txt" else r"(?:python-?)?(\d+)\.(\d+)(?:\.\d+)?"
    match = re.fullmatch(pattern, value)
    if not match:
        example = "python-3.12.1" if name == "runtime.txt" else "3.12 or 3.12.1"
        raise BuildpackError(f"{name}: {value[:40]!r} is not a CPython version like {example}")
    return int(match[1]), int(match[2])


def installed_pythons(which=shutil.which) -> dict[str, str]:
    """{"3.11": "/usr/bin/python3.11", ...}: the interpreters on PATH, plus the one running us."""
    found = {f"{sys.version_info.major}.{sys.version_info.minor}": sys.executable}
    for minor in range(8, 20):
        path = which(f"python3.{minor}")
        if path:
            found.setdefault(f"3.{minor}", path)
    return found


def choose_python(directory: Path, which=shutil.which) -> tuple[str, str | None]:
    for name in VERSION_FILES:
        text = _read(directory, name)
        if text is None:
            continue
        major, minor = parse_python_version(text, name)
        wanted = f"{major}.{minor}"
        if wanted == f"{sys.version_info.major}.{sys.version_info.minor}":
            return sys.executable, name
        if found := which(f"python{wanted}"):
            return found, name
        pythons = installed_pythons(which)
        raise BuildpackError(f"{name}: asks for Python {wanted}, which is not installed here "
                             f"(installed: {', '.join(sorted(pythons, key=lambda v: tuple(map(int, v.split('.')))))})")
    return sys.executable, None


def parse_package_json(text: str) -> dict:
    """package.json's scripts ({name: command}), refusing what npm could not run."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise BuildpackError(f"{PACKAGE_JSON}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BuildpackError(f"{PACKAGE_JSON}: must be a JSON object, like {{\"name\": \"app\", \"scripts\": {{}}}}")
    scripts = data.get("scripts", {})
    if not isinstance(scripts, dict):
        raise BuildpackError(f"{PACKAGE_JSON}: scripts must be an object of name: command strings")
    for name in ("build", "start"):
        if name in scripts and not (isinstance(scripts[name], str) and scripts[name].strip()):
            raise BuildpackError(f"{PACKAGE_JSON}: scripts.{name} must be a non-empty command string")
    return scripts


def node_steps(directory: Path, which=shutil.which) -> tuple[list[str], bool, bool] | None:
    """(npm install arguments, has a build script, has a start script), or None without package.json."""
    text = _read(directory, PACKAGE_JSON)
    if text is None:
        return None
    scripts = parse_package_json(text)
    if which("npm") is None:
        raise BuildpackError(f"{PACKAGE_JSON}: the Node toolchain is needed, and npm is not installed here")
    lockfile = any((directory / name).is_file() for name in NODE_LOCKFILES)
    # --no-audit/--no-fund: a build has no one to read those reports, and the audit is a network call.
    return ["ci" if lockfile else "install", "--no-audit", "--no-fund"], "build" in scripts, "start" in scripts


def default_wsgi_start(directory: Path) -> tuple[list[str], str] | None:
    """(gunicorn argv, the file that chose it) for a repo without a Procfile web: line, or None."""
    if (directory / "manage.py").is_file():
        projects = sorted(p.parent.name for p in directory.glob("*/wsgi.py") if (p.parent / "settings.py").is_file())
        if len(projects) == 1:
            return [*GUNICORN, f"{projects[0]}.wsgi"], f"manage.py and {projects[0]}/wsgi.py"
    for name, target in WSGI_MODULES:
        if (directory / name).is_file():
            return [*GUNICORN, target], name
    return None


def plan(directory: Path, which=shutil.which, runtime: str | None = None) -> BuildPlan:
    """The build plan of the release in `directory` for the template `runtime` (backend, frontend,
    fullstack; None: Python only), or BuildpackError naming the file at fault."""
    directory = Path(directory)
    python, python_from = choose_python(directory, which)
    procfile = _read(directory, PROCFILE)
    processes = parse_procfile(procfile) if procfile is not None else {}
    manifest_text = _read(directory, MANIFEST)
    manifest = parse_manifest(manifest_text) if manifest_text is not None else {}
    notes = []
    if (directory / "requirements.txt").is_file():
        install = ["-r", "requirements.txt"]
        if (directory / "pyproject.toml").is_file():
            notes.append("requirements.txt and pyproject.toml: installing requirements.txt (as Heroku does)")
    elif (directory / "pyproject.toml").is_file():
        install = ["."]
    else:
        install = None
    ignored = sorted(set(processes) - {"web", "release"})
    if ignored:
        notes.append(f"{PROCFILE}: process types {', '.join(ignored)} are not run (only web and release)")
    web = processes.get("web")
    npm_install, npm_build = None, False
    if runtime in NODE_TEMPLATES:
        node = node_steps(directory, which)
        if node is not None:
            npm_install, npm_build, has_start = node
            if web is None and has_start:
                web = NPM_START
            elif web is None and runtime == "frontend":
                raise BuildpackError(f"{PACKAGE_JSON}: scripts has no start and there is no {PROCFILE} web: line; "
                                     f"add one, like \"start\": \"node server.js\"")
    elif (directory / PACKAGE_JSON).is_file():
        notes.append(f"{PACKAGE_JSON}: not built, the {runtime or 'Python'} template has no Node toolchain "
                     f"(onboard as frontend or fullstack for npm)")
    if web is None and runtime != "frontend":
        default = default_wsgi_start(directory)
        if default is not None:
            web, chosen_by = default
            notes.append(f"start: {' '.join(web)} (no {PROCFILE} web: line; the default for {chosen_by})")
        elif runtime is not None and not (directory / "server.py").is_file():
            # The template's start runs server.py: say now what is missing, not after a replica dies.
            raise BuildpackError(f"{PROCFILE}: no web: line, and nothing to start by default (server.py, "
                                 f"app.py, application.py, wsgi.py, or manage.py with one PKG/wsgi.py); "
                                 f"add a {PROCFILE} line like 'web: gunicorn --bind 127.0.0.1:$PORT app:app'")
    health = manifest.get("health", {}).get("path")
    if health is None and web is not None:
        health = DEFAULT_HEALTH_PATH
    return BuildPlan(python=python, python_from=python_from, install=install,
                     collectstatic=(directory / "manage.py").is_file(), web=web,
                     release=processes.get("release"), health_path=health, notes=notes,
                     memory_limit_mb=manifest.get("resources", {}).get("memory_limit_mb"),
                     npm_install=npm_install, npm_build=npm_build)


def memory_limit_mb(build_plan: dict | None, spec: dict) -> int:
    """A replica's memory limit: the release's manifest's, else the spec's, else the default."""
    return (build_plan or {}).get("memory_limit_mb") or spec.get("memory_limit_mb", DEFAULT_MEMORY_LIMIT_MB)


def health_path(build_plan: dict | None, spec: dict) -> str:
    """What the probes GET: the plan's (manifest, or "/" under a Procfile), else the spec's, else "/"."""
    return (build_plan or {}).get("health_path") or spec.get("health_path") or DEFAULT_HEALTH_PATH
