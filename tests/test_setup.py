"""setup.sh's decisions, run for real where that needs no network: which Python, which venv, which packages."""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def setup(tmp_path: Path, env: dict, uid: int | None = None, plan: bool = True) -> subprocess.CompletedProcess:
    """Run a copy of setup.sh in a world-readable directory, with only the given commands on PATH."""
    here = tmp_path / "project"
    here.mkdir(exist_ok=True)
    shutil.copy(ROOT / "setup.sh", here / "setup.sh")
    for d in (tmp_path, here):
        d.chmod(0o755)
    env = {"HOME": str(tmp_path), **env, **({"SETUP_PLAN": "1"} if plan else {})}
    demote = (lambda: (os.setgroups([]), os.setgid(uid), os.setuid(uid))) if uid is not None else None
    return subprocess.run(["/bin/sh", str(here / "setup.sh")], env=env, capture_output=True, text=True, timeout=60,
                          preexec_fn=demote, check=False)


def bin_dir(tmp_path: Path, *commands: str, python: str = sys.executable) -> str:
    """A PATH holding only these commands (and `python` as python3)."""
    path = tmp_path / "bin"
    path.mkdir(exist_ok=True)
    for name in ("dirname", "id", *commands):
        if not (path / name).exists():
            (path / name).symlink_to(shutil.which(name))
    if not (path / "python3").exists():
        (path / "python3").symlink_to(python)
    path.chmod(0o755)
    return str(path)


def test_by_default_a_venv_of_its_own_with_python3(tmp_path):
    r = setup(tmp_path, {"PATH": bin_dir(tmp_path, "bwrap")})
    assert r.returncode == 0, r.stderr
    assert f"python: {tmp_path}/bin/python3" in r.stdout and f"venv: {tmp_path}/project/.venv" in r.stdout


def test_an_active_venv_is_used(tmp_path):
    r = setup(tmp_path, {"PATH": bin_dir(tmp_path, "bwrap"), "VIRTUAL_ENV": "/opt/my-venv"})
    assert "venv: /opt/my-venv" in r.stdout and "apt packages: none" in r.stdout


def test_missing_bubblewrap_is_installed_as_root_or_through_sudo(tmp_path):
    sudo = ("sudo",) if os.geteuid() != 0 and shutil.which("sudo") else ()
    r = setup(tmp_path, {"PATH": bin_dir(tmp_path, *sudo)})
    expected = "(as root)" if os.geteuid() == 0 else "(with sudo)" if sudo else "(no sudo: an administrator"
    assert r.returncode == 0 and "apt packages: bubblewrap" in r.stdout and expected in r.stdout


def test_an_old_python_is_refused_with_what_to_do(tmp_path):
    r = setup(tmp_path, {"PATH": bin_dir(tmp_path, "bwrap"), "PYTHON": shutil.which("false")})
    assert r.returncode == 1 and "Python 3.11 or newer" in r.stdout


NOBODY = 65534 if os.geteuid() == 0 else None  # as root, become a user without sudo; a normal user is one already
needs_python3 = pytest.mark.skipif(not os.access("/usr/bin/python3", os.X_OK), reason="no system python3 to run")


@needs_python3
def test_without_bubblewrap_or_sudo_the_venv_is_still_made_and_the_administrator_line_given():
    with tempfile.TemporaryDirectory(dir="/tmp") as shared:  # pytest's own tmp_path may be private to root
        Path(shared).chmod(0o755)
        r = setup(Path(shared), {"PATH": bin_dir(Path(shared), python="/usr/bin/python3")}, uid=NOBODY)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"venv: {shared}/project/.venv" in r.stdout and "no sudo: an administrator must install them" in r.stdout
    assert "python main.py --offline works without it" in r.stdout and "--allow-unisolated" in r.stdout
    assert r.stdout.splitlines()[-1] == "setup:     apt-get update && apt-get install -y bubblewrap"


@needs_python3
def test_without_python3_venv_or_sudo_it_stops_before_anything_with_what_to_ask_for():
    """A python3 whose ensurepip is missing, as Debian's is without python3-venv: no venv can be made."""
    with tempfile.TemporaryDirectory(dir="/tmp") as shared:
        Path(shared).chmod(0o755)
        path = bin_dir(Path(shared), python="/usr/bin/python3")
        (Path(path) / "python3").unlink()
        (Path(path) / "python3").write_text('#!/bin/sh\ncase "$*" in *ensurepip*) exit 1;; esac\n'
                                            'exec /usr/bin/python3 "$@"\n')
        (Path(path) / "python3").chmod(0o755)
        r = setup(Path(shared), {"PATH": path}, uid=NOBODY, plan=False)
        made = (Path(shared) / "project" / ".venv").exists()
    assert r.returncode == 1, r.stdout + r.stderr
    assert "ask an administrator to run" in r.stdout and "apt-get install -y bubblewrap python3-venv" in r.stdout
    assert not made
