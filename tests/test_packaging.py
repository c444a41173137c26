"""pylm as a user gets it: the wheel and sdist built from a clone, and pylm's types as mypy sees
them in a user's own project after the README's installs (``pip install .`` and the editable
``pip install -e .``), each into a fresh virtual environment."""

from __future__ import annotations

import email
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import pylm

ROOT = Path(__file__).resolve().parent.parent
DIST = "pylm-cluster"
# What a clone holds that the build reads.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "MANIFEST.in")

USER_CODE = """\
from pylm.standalone import Client

client = Client("tcp://127.0.0.1:5555", "my_server")
reply: bytes = client.job("foo", b"a message")
reveal_type(client.job("foo", b"a message"))
client.job("foo", "not bytes")
"""
MISUSE_LINE = 6

# A fresh venv and pip take seconds each; a loaded machine may take several times as long.
pytestmark = pytest.mark.timeout(150)


def run(command: list[str], cwd: Path) -> str:
    """Run a command without the caller's PYTHONPATH or MYPYPATH; its output, or fail with it."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PIP_ROOT_USER_ACTION="ignore")
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}{done.stderr}"
    return done.stdout


def clone_of(where: Path) -> Path:
    """A copy of the project's sources, as a fresh clone has them."""
    where.mkdir()
    for name in SOURCES:
        shutil.copy2(ROOT / name, where / name)
    shutil.copytree(ROOT / "pylm", where / "pylm", ignore=shutil.ignore_patterns("__pycache__"))
    return where


def venv_in(where: Path) -> Path:
    """A fresh virtual environment (no system site-packages) that can build pylm without
    fetching a build backend per install; its python."""
    run([sys.executable, "-m", "venv", str(where)], cwd=where.parent)
    python = where / "bin" / "python"
    run([str(python), "-m", "pip", "install", "-q", "setuptools>=77"], cwd=where.parent)
    return python


@pytest.fixture(scope="module")
def builder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return venv_in(tmp_path_factory.mktemp("builder") / "venv")


def mypy_in_project(python: Path, project: Path) -> str:
    """mypy (this one, strict) on a user's project, importing from ``python``'s environment."""
    project.mkdir()
    (project / "app.py").write_text(USER_CODE)
    (project / "pyproject.toml").write_text("[tool.mypy]\nstrict = true\n")
    mypy = [sys.executable, "-m", "mypy", "--python-executable", str(python)]
    done = subprocess.run(
        [*mypy, "--cache-dir", str(project / ".mypy_cache"), "app.py"],
        cwd=project,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.stdout + done.stderr


def assert_types_seen(output: str) -> None:
    """pylm's annotations reached mypy: the reply is bytes (not Any) and a str payload is an
    error, the only one."""
    assert re.search(r'Revealed type is "(builtins\.)?bytes"', output), output
    misuse = f'app.py:{MISUSE_LINE}: error: Argument 2 to "job" of "Client" has incompatible type'
    assert misuse in output, output
    assert "Found 1 error in 1 file" in output, output


def test_the_wheel_and_sdist_carry_the_license_types_and_metadata(
    builder: Path, tmp_path: Path
) -> None:
    clone = clone_of(tmp_path / "clone")
    out = tmp_path / "dist"
    # The PEP 517 hooks any front end (pip, build) calls.
    build = (
        "import sys, setuptools.build_meta as backend\n"
        "out = sys.argv[1]\n"  # setuptools rewrites sys.argv
        "backend.build_wheel(out), backend.build_sdist(out)\n"
    )
    run([str(builder), "-c", build, str(out)], cwd=clone)
    [wheel_name] = [p.name for p in out.glob("*.whl")]
    [sdist_name] = [p.name for p in out.glob("*.tar.gz")]
    dist_info = f"pylm_cluster-{pylm.__version__}.dist-info"

    with zipfile.ZipFile(out / wheel_name) as wheel:
        names = set(wheel.namelist())
        metadata = email.message_from_bytes(wheel.read(f"{dist_info}/METADATA"))
        entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
        top_level = wheel.read(f"{dist_info}/top_level.txt").decode().split()
    modules = {p.relative_to(clone).as_posix() for p in (clone / "pylm").rglob("*.py")}
    assert modules <= names, f"modules missing from the wheel: {sorted(modules - names)}"
    assert {"pylm/py.typed", f"{dist_info}/licenses/LICENSE"} <= names
    assert top_level == ["pylm"]
    assert metadata["Name"] == DIST
    assert metadata["Version"] == pylm.__version__
    assert metadata["License-Expression"] == "MIT"
    assert metadata.get_all("License-File") == ["LICENSE"]
    classifiers = metadata.get_all("Classifier") or []
    assert "Typing :: Typed" in classifiers
    assert not [c for c in classifiers if c.startswith("License ::")]  # PEP 639: the expression
    assert "pylm = pylm.cli:main" in entry_points  # the command keeps its name
    assert "pylm = pylm.testing" in entry_points  # the pytest plugin

    with tarfile.open(out / sdist_name) as sdist:
        top = f"pylm_cluster-{pylm.__version__}"
        members = set(sdist.getnames())
    wanted = {"LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml", "pylm/py.typed"}
    assert {f"{top}/{name}" for name in wanted} <= members


def install_and_check(python: Path, tmp_path: Path, editable: bool) -> None:
    clone = clone_of(tmp_path / "clone")
    # The README's command; --no-deps and --no-build-isolation keep it to pylm itself, built with
    # the environment's setuptools (types need neither pylm's dependencies nor a fresh backend).
    install = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    run([*install, *(["-e"] if editable else []), "."], cwd=clone)

    where = run([str(python), "-c", "import pylm; print(pylm.__file__)"], cwd=tmp_path).strip()
    # The editable install serves the clone's files; the other, a copy in site-packages.
    assert Path(where).is_relative_to(clone) == editable, where

    assert_types_seen(mypy_in_project(python, tmp_path / "user"))


def test_mypy_sees_pylm_types_in_a_user_project_after_pip_install(
    builder: Path, tmp_path: Path
) -> None:
    install_and_check(builder, tmp_path, editable=False)


def test_mypy_sees_pylm_types_in_a_user_project_after_an_editable_install(tmp_path: Path) -> None:
    # An import-hook editable (setuptools' default for this layout without package-dir) would
    # leave mypy with "Cannot find implementation or library stub for module named pylm".
    install_and_check(venv_in(tmp_path / "venv"), tmp_path, editable=True)
