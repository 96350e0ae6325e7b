"""gpu-agentd's top-level ``collectors`` and ``rules`` cannot silently mix with another
distribution's (agentd/integrity.py, docs/packaging.md).

Two layers:

* fast, no network: a site-packages folder laid out by hand the way pip leaves it (our files and
  RECORD, another distribution's RECORD and files written over ours or under ours), checked by
  ``import_conflicts()`` and by the real ``agentd run`` in a subprocess;
* the proof (about 30-40 s): the wheel built from this tree (``pip wheel . --no-deps``, once per
  session), installed into fresh virtual environments next to the real PyPI distribution
  ``rules`` (a Django authorization library that also installs a top-level ``rules``), in both
  orders; ``agentd run`` refuses to start in both, and starts and stops cleanly in a clean one.
  Skipped only when PyPI cannot be reached, and failed instead when ``CI`` is set.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import site as sitepackages
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agentd import integrity

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("agentd", "collectors", "rules")
# Like PyPI rules 3.5's __init__.py, it imports (its own modules, not Django): ``agentd`` still
# loads with it, which is what makes a clash silent without the check.
THEIR_INIT = b"VERSION = (3, 5, 0, 'final', 1)  # the other distribution's package\n"


def _hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _write_dist(site: Path, name: str, version: str, files: dict[str, bytes], top_level: list[str]) -> None:
    """Write ``files`` under ``site`` and a dist-info whose RECORD lists them, as pip does."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "top_level.txt").write_text("\n".join(top_level) + "\n")
    for rel, data in files.items():
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    lines = [f"{rel},{_hash(data)},{len(data)}" for rel, data in files.items()]
    lines += [f"{info.name}/METADATA,,", f"{info.name}/top_level.txt,,", f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(lines) + "\n")


def _our_files() -> dict[str, bytes]:
    return {p.relative_to(REPO).as_posix(): p.read_bytes()
            for name in PACKAGES for p in sorted((REPO / name).rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def _theirs(site: Path) -> None:
    _write_dist(site, "rules", "3.5", {"rules/__init__.py": THEIR_INIT, "rules/apps.py": b"# theirs\n"}, ["rules"])


def _conflicts(*path: Path) -> list[str]:
    """``import_conflicts()`` in a Python that sees only ``path`` (and the standard library)."""
    code = ("import json, sys; sys.path[:0] = json.loads(sys.argv[1]); "
            "from agentd.integrity import import_conflicts; print(json.dumps(import_conflicts()))")
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code, json.dumps([str(p) for p in path])],
                          capture_output=True, text=True, timeout=60, cwd=path[0])
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_source_checkout_is_not_refused():
    """The tests themselves run from the repository (pythonpath = ".", an editable install or none)."""
    assert integrity.import_conflicts() == []
    integrity.check_imports()  # does not raise


def test_a_clean_install_has_no_conflict(tmp_path):
    _write_dist(tmp_path, "gpu-agentd", "0.1.0", _our_files(), list(PACKAGES))
    assert _conflicts(tmp_path) == []


def test_another_distribution_installed_over_ours_is_named(tmp_path):
    """pip install gpu-agentd, then pip install rules: their __init__.py replaces ours."""
    _write_dist(tmp_path, "gpu-agentd", "0.1.0", _our_files(), list(PACKAGES))
    _theirs(tmp_path)
    found = _conflicts(tmp_path)
    assert len(found) == 3, found
    assert found[0].startswith("import package 'rules' is installed by distribution 'rules' 3.5 as well as by "
                               "gpu-agentd 0.1.0")
    assert f"{tmp_path}/rules/__init__.py is not the file gpu-agentd 0.1.0 installed" in found[1]
    assert "distribution 'rules' 3.5 also installs it" in found[1]
    assert "holds 1 file(s) gpu-agentd did not install (distribution 'rules' 3.5 did): rules/apps.py" in found[2]


def test_ours_installed_over_another_distribution_is_named(tmp_path):
    """pip install rules, then pip install gpu-agentd: our files are intact, theirs are not."""
    _theirs(tmp_path)
    _write_dist(tmp_path, "gpu-agentd", "0.1.0", _our_files(), list(PACKAGES))
    found = _conflicts(tmp_path)
    assert found[0].endswith("'rules' 3.5 is broken here: its rules/__init__.py no longer match its RECORD")
    assert any("rules/apps.py" in line and "'rules' 3.5 did" in line for line in found)
    assert not any("is not the file gpu-agentd" in line for line in found)


def test_a_changed_or_missing_file_of_ours_is_named(tmp_path):
    _write_dist(tmp_path, "gpu-agentd", "0.1.0", _our_files(), list(PACKAGES))
    (tmp_path / "collectors" / "sim.py").write_text("# edited\n")
    (tmp_path / "rules" / "engine.py").unlink()
    found = _conflicts(tmp_path)
    assert any(line.startswith(f"{tmp_path}/collectors/sim.py is not the file gpu-agentd 0.1.0 installed")
               for line in found), found
    assert any(line.startswith(f"{tmp_path}/rules/engine.py is missing") for line in found), found


def test_a_package_without_its_init_is_named(tmp_path):
    """Uninstalling the other distribution removes the __init__.py it overwrote: ours is gone too."""
    _write_dist(tmp_path, "gpu-agentd", "0.1.0", _our_files(), list(PACKAGES))
    (tmp_path / "rules" / "__init__.py").unlink()
    found = _conflicts(tmp_path)
    assert any(f"{tmp_path}/rules/__init__.py is missing (uninstalling another distribution" in line
               for line in found), found


def test_a_rules_package_earlier_on_the_path_is_named(tmp_path):
    site, other = tmp_path / "site", tmp_path / "other"
    _write_dist(site, "gpu-agentd", "0.1.0", _our_files(), list(PACKAGES))
    (other / "rules").mkdir(parents=True)
    (other / "rules" / "__init__.py").write_text("")
    found = _conflicts(other, site)
    assert found == [f"import package 'rules' loads from {other}/rules, not from gpu-agentd's {site}/rules/ "
                     "(another package of that name comes first on sys.path)"]


def test_a_checkout_in_front_of_an_installed_copy_is_not_refused(tmp_path):
    """Running from a checkout while a (clashing) copy is installed: the running files are the
    checkout's, which is what running from a checkout means."""
    _write_dist(tmp_path, "gpu-agentd", "0.1.0", _our_files(), list(PACKAGES))
    _theirs(tmp_path)
    assert _conflicts(REPO, tmp_path) == []


def test_agentd_run_refuses_to_start_and_says_what_to_do(tmp_path):
    """The real ``agentd run`` (this tree's code, laid out as an install next to another
    ``rules``): exit 1 and one message naming both distributions and the fix; nothing written."""
    site = tmp_path / "site"
    _write_dist(site, "gpu-agentd", "0.1.0", _our_files(), list(PACKAGES))
    _theirs(site)
    state = tmp_path / "state"
    config = tmp_path / "agentd.toml"
    config.write_text(f'backend = "sim"\nstate_dir = "{state}"\ninterval = 0.1\n[sim]\ngpus = 1\n[rules]\ndirs = []\n')
    code = ("import sys; sys.path.insert(0, sys.argv.pop(1)); from agentd.cli import main; "
            "sys.argv[0] = 'agentd'; main()")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTD_", "NOTIFY_"))}
    env["AGENTD_API__LISTEN"] = "127.0.0.1:0"
    proc = subprocess.run([sys.executable, "-I", "-c", code, str(site), "run", "--config", str(config)],
                          capture_output=True, text=True, timeout=20, cwd=tmp_path, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.startswith("agentd: refusing to start: gpu-agentd's import packages")
    assert "distribution 'rules' 3.5" in proc.stderr and "gpu-agentd 0.1.0" in proc.stderr
    assert "fix: install gpu-agentd in a virtual environment of its own" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (state / "store.sqlite").exists()  # refused before the store was opened


def test_a_foreign_rules_that_cannot_even_import_still_gets_the_message(tmp_path):
    """The console script (``agentd.integrity:main``) checks when the CLI cannot be imported:
    another ``rules/__init__.py`` needing Django ends in the message, not a traceback."""
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["agentd"] == "agentd.integrity:main"
    site = tmp_path / "site"
    _write_dist(site, "gpu-agentd", "0.1.0", _our_files(), list(PACKAGES))
    _write_dist(site, "rules", "3.5", {"rules/__init__.py": b"import django_is_not_installed\n"}, ["rules"])
    code = ("import sys; sys.path.insert(0, sys.argv.pop(1)); from agentd.integrity import main; "
            "sys.argv[0] = 'agentd'; main()")
    proc = subprocess.run([sys.executable, "-I", "-c", code, str(site), "check-config"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.startswith("agentd: refusing to start") and "'rules' 3.5" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_error_is_an_oserror_with_every_conflict():
    err = integrity.ImportConflictError(["a", "b"])
    assert isinstance(err, OSError) and err.conflicts == ["a", "b"]
    text = str(err)
    assert "\n  - a\n  - b\n  fix: " in text and "/opt/agentd" in text


# -- the proof: the built wheel and PyPI's rules in fresh virtual environments ----------------


def _run(cmd: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def _pip(venv: Path, *args: str) -> None:
    """The test environment's pip, installing into ``venv`` (its own pip is left out: faster)."""
    proc = _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "--disable-pip-version-check",
                 "-q", *args])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def wheels(tmp_path_factory) -> dict[str, Path]:
    """PyPI's ``rules`` wheel, and gpu-agentd's built from this tree (a copy: nothing is written
    into the checkout)."""
    root = tmp_path_factory.mktemp("wheels")
    got = _run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
                "--only-binary", ":all:", "-d", str(root / "pypi"), "rules"], timeout=120)
    if got.returncode != 0:
        reason = f"PyPI unreachable (pip download rules failed): {got.stderr.strip().splitlines()[-1:]}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    src = root / "src"
    for name in PACKAGES:
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    built = _run([sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "--no-deps", "-q",
                  "-w", str(root / "dist"), str(src)])
    assert built.returncode == 0, built.stdout + built.stderr
    return {"rules": next((root / "pypi").glob("rules-*.whl")), "agentd": next((root / "dist").glob("gpu_agentd-*.whl"))}


def _venv(path: Path, *wheels: Path) -> Path:
    """A fresh virtual environment into which pip installs ``wheels`` in this order, as an
    operator would one after the other. Their dependencies are this test environment's, made
    visible by a .pth file rather than downloaded again (tests/test_units.py proves the full
    install from PyPI): what is under test is only how the two wheels share site-packages."""
    assert _run([sys.executable, "-m", "venv", "--without-pip", str(path)]).returncode == 0
    site = next((path / "lib").glob("python3*/site-packages"))
    (site / "zz_test_dependencies.pth").write_text("\n".join(sitepackages.getsitepackages()) + "\n")
    for wheel in wheels:
        _pip(path, "install", "--no-deps", "--no-index", "--no-compile", str(wheel))
    return path


def _config(tmp_path: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "agentd.toml"
    config.write_text(f'backend = "sim"\nstate_dir = "{tmp_path / "state"}"\ninterval = 0.1\n'
                      f'[sim]\ngpus = 2\n[rules]\ndirs = []\n')
    return config


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTD_", "NOTIFY_", "PYTHON"))}
    return env | {"AGENTD_API__LISTEN": "127.0.0.1:0"}  # a free port: a daemon on 9410 must not decide a case


def _refused(venv: Path, tmp_path: Path) -> str:
    proc = _run([str(venv / "bin" / "agentd"), "run", "--config", str(_config(tmp_path))], timeout=30,
                cwd=tmp_path, env=_env())
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert not (tmp_path / "state" / "store.sqlite").exists()
    return proc.stderr


def test_the_wheel_starts_alone_and_is_refused_once_pypi_rules_is_installed_after_it(wheels, tmp_path):
    """pip install gpu-agentd: starts and stops cleanly; then pip install rules, which writes its
    rules/__init__.py over ours: the next start is refused."""
    venv = _venv(tmp_path / "venv", wheels["agentd"])
    _starts_and_stops(venv, tmp_path / "clean")
    _pip(venv, "install", "--no-deps", "--no-index", str(wheels["rules"]))
    err = _refused(venv, tmp_path / "clash")
    site = next((venv / "lib").glob("python3*/site-packages"))
    version = wheels["rules"].name.split("-")[1]
    assert err.startswith(f"agentd: refusing to start: gpu-agentd's import packages (agentd, collectors, rules) "
                          f"in {site} are shared with another distribution:")
    assert f"import package 'rules' is installed by distribution 'rules' {version} as well as by gpu-agentd" in err
    assert f"{site}/rules/__init__.py is not the file gpu-agentd" in err
    assert "fix: install gpu-agentd in a virtual environment of its own" in err


def test_the_wheel_installed_after_pypi_rules_is_refused(wheels, tmp_path):
    """pip install rules, then pip install gpu-agentd: ours wins the file, theirs is broken."""
    venv = _venv(tmp_path / "venv", wheels["rules"], wheels["agentd"])
    err = _refused(venv, tmp_path / "clash")
    version = wheels["rules"].name.split("-")[1]
    assert f"'rules' {version} is broken here: its rules/__init__.py no longer match its RECORD" in err
    assert f"(distribution 'rules' {version} did)" in err
    assert "fix: install gpu-agentd in a virtual environment of its own" in err


def _starts_and_stops(venv: Path, tmp_path: Path) -> None:
    """``agentd run`` on the simulator until it logs ``started``, then SIGTERM: exit 0."""
    proc = subprocess.Popen([str(venv / "bin" / "agentd"), "run", "--config", str(_config(tmp_path))],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=_env())
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:  # a thread of its own: select() on a buffered pipe can miss a line
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if '"event": "started"' in line:
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert started.wait(60) and proc.poll() is None, "".join(lines)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines)
    assert proc.returncode == 0, out
    assert "refusing" not in out and '"event": "stopped"' in out
    assert (tmp_path / "state" / "store.sqlite").exists()
