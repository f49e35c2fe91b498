"""Build plans from the buildpack conventions: Procfile, cicd.toml, requirements/pyproject,
.python-version/runtime.txt, manage.py. Repos are written in tmp_path; nothing runs."""
from __future__ import annotations

import sys

import pytest

from cicd.delivery import buildpack
from cicd.delivery.buildpack import BuildpackError, expand_port, parse_command, plan
from cicd.delivery.examples import SAMPLE_SERVICE

HERE = f"{sys.version_info.major}.{sys.version_info.minor}"


def repo(tmp_path, **files):
    for name, text in files.items():
        (tmp_path / name.replace("__", ".")).write_text(text)
    return tmp_path


def test_a_bare_directory_keeps_the_template_defaults(tmp_path):
    p = plan(tmp_path)
    assert p.web is None and p.release is None and p.install is None and not p.collectstatic
    assert p.python == sys.executable and p.python_from is None
    assert buildpack.health_path(p.to_dict(), {"health_path": "/health"}) == "/health"
    assert buildpack.health_path(p.to_dict(), {}) == "/"


def test_the_sample_service_keeps_its_template_start_and_health():
    p = plan(SAMPLE_SERVICE)
    assert p.web is None and p.install is None
    assert buildpack.health_path(p.to_dict(), {"health_path": "/health"}) == "/health"


def test_procfile_web_and_release_are_argument_lists(tmp_path):
    p = plan(repo(tmp_path, Procfile="# comment\n\nweb: gunicorn --bind 127.0.0.1:$PORT 'app:make_app()'\n"
                                     "release: python manage.py migrate --noinput\nworker: celery -A x worker\n"))
    assert p.web == ["gunicorn", "--bind", "127.0.0.1:$PORT", "app:make_app()"]
    assert p.release == ["python", "manage.py", "migrate", "--noinput"]
    assert any("worker" in note for note in p.notes)
    # An app that brings its own start command is probed at "/" unless its manifest says otherwise.
    assert buildpack.health_path(p.to_dict(), {"health_path": "/health"}) == "/"


def test_port_is_expanded_inside_arguments_in_both_spellings():
    argv = parse_command("server --port=$PORT --bind 0.0.0.0:${PORT}", "x")
    assert expand_port(argv, 8123) == ["server", "--port=8123", "--bind", "0.0.0.0:8123"]


@pytest.mark.parametrize("command, culprit", [
    ("gunicorn app:app | tee log", "'|'"),
    ("python migrate.py && gunicorn app:app", "'&&'"),
    ("python a.py; python b.py", "';'"),
    ("gunicorn app:app > out.log", "'>'"),
    ("gunicorn app:app 2>&1", ">&"),
    ("gunicorn `cat cmd`", "backticks"),
    ("gunicorn --workers $WEB_CONCURRENCY app:app", "$WEB_CONCURRENCY"),
    ("gunicorn --bind :$PORTX app:app", "$PORTX"),
    ("gunicorn $(echo app:app)", "$(echo"),
    ("DEBUG=1 gunicorn app:app", "VAR=value"),
    ("gunicorn 'app:app", "cannot be split"),
])
def test_anything_needing_a_shell_is_refused_naming_the_line(tmp_path, command, culprit):
    repo(tmp_path, Procfile=f"release: python manage.py migrate\nweb: {command}\n")
    with pytest.raises(BuildpackError) as err:
        plan(tmp_path)
    message = str(err.value)
    assert message.startswith("Procfile line 2 (web: ") and culprit in message, message


@pytest.mark.parametrize("text, rule", [
    ("web gunicorn app:app\n", "TYPE: COMMAND"),
    ("web:\n", "empty"),
    ("web: a\nweb: b\n", "defined twice"),
    ("we b: a\n", "TYPE: COMMAND"),
])
def test_malformed_procfile_lines_are_refused(tmp_path, text, rule):
    with pytest.raises(BuildpackError, match=rf"^Procfile line \d.*{rule}"):
        plan(repo(tmp_path, Procfile=text))


def test_manifest_gives_the_health_path_over_everything(tmp_path):
    repo(tmp_path, Procfile="web: gunicorn app:app\n", cicd__toml='[health]\npath = "/healthz"\n')
    assert buildpack.health_path(plan(tmp_path).to_dict(), {"health_path": "/health"}) == "/healthz"


def test_manifest_gives_the_memory_limit_over_the_spec(tmp_path):
    spec = {"memory_limit_mb": 512}
    assert buildpack.memory_limit_mb(plan(repo(tmp_path)).to_dict(), spec) == 512  # no manifest: the spec's
    repo(tmp_path, cicd__toml='[resources]\nmemory_limit_mb = 32\n')
    assert plan(tmp_path).memory_limit_mb == 32
    assert buildpack.memory_limit_mb(plan(tmp_path).to_dict(), spec) == 32
    repo(tmp_path, cicd__toml='[resources]\nmemory_limit_mb = 65536\n')
    assert buildpack.memory_limit_mb(plan(tmp_path).to_dict(), spec) == 65536
    assert buildpack.memory_limit_mb(None, {}) == buildpack.DEFAULT_MEMORY_LIMIT_MB  # a spec from before the field


@pytest.mark.parametrize("text, message", [
    ('[health]\npath = "/x"\ntimeout = 3\n', "unknown key 'health.timeout'"),
    ('[healthcheck]\npath = "/x"\n', "unknown key 'healthcheck'"),
    ('health = 3\n', "'health' must be a table"),
    ('[health]\npath = "healthz"\n', "health.path must be a string starting with '/'"),
    ('[health]\npath = "/a b"\n', "health.path"),
    ('[health\n', "not valid TOML"),
    ('[resources]\nmemory_limit_mb = 16\n', "resources.memory_limit_mb must be 32-65536 (MB), got 16"),
    ('[resources]\nmemory_limit_mb = 70000\n', "resources.memory_limit_mb must be 32-65536 (MB), got 70000"),
    ('[resources]\nmemory_limit_mb = "1G"\n', "resources.memory_limit_mb must be a whole number of megabytes, not str"),
    ('[resources]\nmemory_limit_mb = 512.5\n', "resources.memory_limit_mb must be a whole number of megabytes"),
    ('[resources]\nmemory_limit_mb = true\n', "resources.memory_limit_mb must be a whole number of megabytes, not bool"),
    ('[resources]\ncpu = 2\n', "unknown key 'resources.cpu'"),
])
def test_a_bad_manifest_is_refused_naming_the_key(tmp_path, text, message):
    with pytest.raises(BuildpackError) as err:
        plan(repo(tmp_path, cicd__toml=text))
    assert str(err.value).startswith("cicd.toml: ") and message in str(err.value)


def test_requirements_then_pyproject(tmp_path):
    assert plan(repo(tmp_path, pyproject__toml="[project]\nname='x'\n")).install == ["."]
    p = plan(repo(tmp_path, requirements__txt="flask\n"))
    assert p.install == ["-r", "requirements.txt"] and any("requirements.txt" in n for n in p.notes)


def test_manage_py_means_collectstatic(tmp_path):
    assert plan(repo(tmp_path, manage__py="")).collectstatic


@pytest.mark.parametrize("name, text", [(".python-version", f"{HERE}\n"), (".python-version", f"{HERE}.1\n"),
                                        ("runtime.txt", f"python-{HERE}.4\n")])
def test_a_requested_interpreter_that_exists_is_used(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    p = plan(tmp_path, which=lambda _: None)  # only the running interpreter is "installed"
    assert p.python == sys.executable and p.python_from == name


def test_the_interpreter_is_looked_up_by_its_versioned_name(tmp_path):
    (tmp_path / ".python-version").write_text("3.99\n")
    found = {"python3.99": "/opt/py/bin/python3.99"}
    assert plan(tmp_path, which=found.get).python == "/opt/py/bin/python3.99"
    (tmp_path / ".python-version").write_text("3.98\n")
    with pytest.raises(BuildpackError, match=r"^\.python-version: asks for Python 3\.98, which is not installed "
                                             rf"here \(installed: .*{HERE}.*\)"):
        plan(tmp_path, which=found.get)


@pytest.mark.parametrize("name, text", [("runtime.txt", f"{HERE}\n"), ("runtime.txt", "pypy-7.3\n"),
                                        (".python-version", "latest\n"), (".python-version", "")])
def test_an_unreadable_version_is_refused_naming_the_file(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(BuildpackError, match=rf"^{name}: .* is not a CPython version"):
        plan(tmp_path)


def test_python_version_wins_over_runtime_txt(tmp_path):
    repo(tmp_path, **{".python-version": f"{HERE}\n", "runtime.txt": "python-2.7.18\n"})
    assert plan(tmp_path).python_from == ".python-version"


# -- the Node toolchain (frontend and fullstack templates) -----------------------------------
NPM = {"npm": "/usr/bin/npm"}.get   # npm "installed", whatever this machine has
EXPRESS = '{"name": "web", "dependencies": {"express": "^4"}, "scripts": {"start": "node server.js"}}'


def test_package_json_without_a_lockfile_is_npm_install_and_starts_with_npm_start(tmp_path):
    p = plan(repo(tmp_path, package__json=EXPRESS), which=NPM, runtime="frontend")
    assert p.npm_install[0] == "install" and not p.npm_build
    assert p.web == ["npm", "start"]
    # An app that brings its own start is probed at "/", not at the template's /health.
    assert buildpack.health_path(p.to_dict(), {"health_path": "/health"}) == "/"


@pytest.mark.parametrize("lockfile", ["package-lock.json", "npm-shrinkwrap.json"])
def test_a_lockfile_means_npm_ci(tmp_path, lockfile):
    (tmp_path / lockfile).write_text("{}")
    assert plan(repo(tmp_path, package__json=EXPRESS), which=NPM, runtime="frontend").npm_install[0] == "ci"


def test_a_build_script_means_npm_run_build_and_the_procfile_still_starts(tmp_path):
    repo(tmp_path, package__json='{"scripts": {"build": "vite build", "start": "vite preview"}}',
         Procfile="web: node dist/server.js --port $PORT\n")
    p = plan(tmp_path, which=NPM, runtime="frontend")
    assert p.npm_build and p.npm_install[0] == "install"
    assert p.web == ["node", "dist/server.js", "--port", "$PORT"]


def test_fullstack_without_a_start_script_builds_with_node_and_starts_the_python_default(tmp_path):
    p = plan(repo(tmp_path, server__py="", package__json='{"scripts": {"build": "node build.js"}}'), which=NPM, runtime="fullstack")
    assert p.npm_build and p.web is None  # the template's `python server.py ...`
    assert buildpack.health_path(p.to_dict(), {"health_path": "/health"}) == "/health"


def test_frontend_needs_a_start_script_or_a_procfile_naming_package_json(tmp_path):
    repo(tmp_path, package__json='{"scripts": {"build": "tsc"}}')
    with pytest.raises(BuildpackError, match=r"^package\.json: scripts has no start and there is no Procfile web:"):
        plan(tmp_path, which=NPM, runtime="frontend")
    (tmp_path / "Procfile").write_text("web: node server.js\n")
    assert plan(tmp_path, which=NPM, runtime="frontend").web == ["node", "server.js"]


@pytest.mark.parametrize("text, message", [
    ('{"name": "web",}', "not valid JSON"),
    ('["express"]', "must be a JSON object"),
    ('{"scripts": ["start"]}', "scripts must be an object"),
    ('{"scripts": {"start": ""}}', "scripts.start must be a non-empty command string"),
    ('{"scripts": {"build": 3, "start": "node s.js"}}', "scripts.build must be"),
])
def test_a_malformed_package_json_is_refused_naming_it(tmp_path, text, message):
    with pytest.raises(BuildpackError) as err:
        plan(repo(tmp_path, package__json=text), which=NPM, runtime="fullstack")
    assert str(err.value).startswith("package.json: ") and message in str(err.value)


def test_without_npm_a_node_app_is_refused_naming_package_json(tmp_path):
    with pytest.raises(BuildpackError, match=r"^package\.json: .*npm is not installed here"):
        plan(repo(tmp_path, package__json=EXPRESS), which=lambda _: None, runtime="frontend")


def test_the_backend_template_notes_a_package_json_and_leaves_it(tmp_path):
    p = plan(repo(tmp_path, server__py="", package__json="not even json"), which=NPM, runtime="backend")
    assert p.npm_install is None and p.web is None
    assert any(note.startswith("package.json: not built") for note in p.notes)


@pytest.mark.parametrize("runtime", ["backend", "frontend", "fullstack"])
def test_the_sample_service_keeps_its_template_start_in_every_template(runtime):
    p = plan(SAMPLE_SERVICE, runtime=runtime)
    assert p.web is None and p.npm_install is None


@pytest.mark.parametrize("files, web", [
    ({"app.py": ""}, "app:app"),
    ({"application.py": "", "app.py": ""}, "application:app"),   # Oryx's order: application.py first
    ({"wsgi.py": ""}, "wsgi"),
    ({"manage.py": "", "mysite/wsgi.py": "", "mysite/settings.py": "", "app.py": ""}, "mysite.wsgi"),
])
def test_without_a_procfile_a_wsgi_app_starts_with_gunicorn_on_loopback(tmp_path, files, web):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    p = plan(tmp_path, runtime="backend")
    assert p.web == ["gunicorn", "--bind", "127.0.0.1:$PORT", web]
    assert buildpack.health_path(p.to_dict(), {"health_path": "/health"}) == "/"
    assert any(n.startswith("start: gunicorn") and "no Procfile web: line" in n for n in p.notes)


def test_the_procfile_wins_over_the_default_wsgi_start(tmp_path):
    p = plan(repo(tmp_path, app__py="", Procfile="web: python app.py $PORT\n"), runtime="backend")
    assert p.web == ["python", "app.py", "$PORT"] and not any(n.startswith("start:") for n in p.notes)


def test_a_django_repo_with_two_projects_is_not_guessed_but_refused(tmp_path):
    for name in ("manage.py", "one/wsgi.py", "one/settings.py", "two/wsgi.py", "two/settings.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    with pytest.raises(BuildpackError, match=r"Procfile: no web: line, and nothing to start by default"):
        plan(tmp_path, runtime="backend")
