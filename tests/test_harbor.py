"""The Harbor export, run as Harbor's containers would see it: bubblewrap stands in for Docker."""
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from conftest import bz2_bomb
from test_no_answer_key import ANSWER_KEY
from test_tools import needs_bwrap

from conversions import convert
from harbor_export import GRADED_FILE, export
from task import build_prompt, make_instance
from tools import SYSTEM_PATHS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> list[Path]:
    return export(tmp_path_factory.mktemp("harbor"), 10, range(3, 5))


def test_task_toml_has_what_harbor_requires(exported):
    for directory in exported:
        seed = int(directory.name.rsplit("-", 1)[1])
        config = tomllib.loads((directory / "task.toml").read_text())
        assert config["schema_version"] == "1.4"
        assert config["task"]["name"] == f"megatron-port/level-10-seed-{seed}"
        assert config["metadata"] == {"level": 10, "seed": seed, "difficulty": "level 10 of 11"}
        assert config["verifier"]["environment_mode"] == "separate" and config["verifier"]["timeout_sec"] > 0
        assert config["agent"]["timeout_sec"] > 0 and config["agent"]["user"] == "agent"
        assert config["environment"]["network_mode"] == "no-network"
        assert config["artifacts"] == [GRADED_FILE]
        for name in ("instruction.md", "environment/Dockerfile", "tests/test.sh", "tests/Dockerfile",
                     "solution/solve.sh"):
            assert (directory / name).is_file(), name
        assert os.access(directory / "tests" / "test.sh", os.X_OK)
    assert (exported[0].parent / "README.md").read_text().count("megatron-port/level-10-seed-") == 2


def test_instruction_is_the_prompt_for_a_harness_without_submit(exported):
    text = (exported[0] / "instruction.md").read_text()
    assert text == build_prompt(10, None, GRADED_FILE)
    assert GRADED_FILE in text and "`submit`" not in text and "replies" not in text
    assert "at most 0.0001" in text  # what is graded is stated as in main.py's prompt


def test_the_agent_image_holds_nothing_of_the_grader(exported):
    secrets = [*ANSWER_KEY, "def convert(", "def random_files(", "def moe(h"]
    for directory in exported:
        env = directory / "environment"
        names = {p.name for p in env.rglob("*")}
        assert not names & {"grader.py", "conversions.py", "source_model.py", "source_gdn.py", "megatron_checkpoint.py",
                            "task.py", "instances.py", "diagnosis.py"}
        for path in (p for p in env.rglob("*") if p.is_file()):  # every file of the image's build context
            data = path.read_bytes()
            assert not any(s.encode() in data for s in secrets), path
        dockerfile = (env / "Dockerfile").read_text()
        assert f"numpy=={np.__version__}" in dockerfile and "USER agent" in dockerfile
        assert "tests" not in dockerfile and "solution" not in dockerfile


def container(root_binds: dict[str, Path], writable: dict[str, Path], command: list[str]) -> subprocess.CompletedProcess:
    """Run `command` in a fresh root holding the system, this Python with numpy, and the given binds."""
    args = ["bwrap", "--unshare-all", "--die-with-parent", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    for path in SYSTEM_PATHS:
        args += ["--ro-bind-try", path, path]
    for target, source in root_binds.items():
        args += ["--ro-bind", str(source), target]
    for target, source in writable.items():
        args += ["--bind", str(source), target]
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}
    return subprocess.run(args + command, env=env, capture_output=True, text=True, timeout=300, check=False)


def run_agent_then_verifier(task_dir: Path, tmp: Path, solve: list[str] | None) -> dict:
    """The agent's container (/app), then the separate verifier's (/tests, /logs/verifier, the artifact)."""
    app = tmp / "app"
    shutil.copytree(task_dir / "environment" / "workspace", app)
    if solve is not None:
        r = container({"/solution": task_dir / "solution"}, {"/app": app}, solve)
        assert r.returncode == 0, r.stderr
    verifier_app, logs = tmp / "verifier-app", tmp / "logs"
    verifier_app.mkdir()
    logs.mkdir()
    if (app / "converted.npz").exists():  # Harbor uploads the artifact to the same path, if it exists
        shutil.copy(app / "converted.npz", verifier_app / "converted.npz")
    r = container({"/tests": task_dir / "tests"}, {"/app": verifier_app, "/logs/verifier": logs},
                  ["bash", "/tests/test.sh"])
    assert r.returncode == 0, r.stderr
    return {"txt": (logs / "reward.txt").read_text(), "json": json.loads((logs / "reward.json").read_text()),
            "grade": json.loads((logs / "grade.json").read_text())}


@needs_bwrap
def test_oracle_scores_one(exported, tmp_path):
    out = run_agent_then_verifier(exported[0], tmp_path, ["bash", "/solution/solve.sh"])
    assert out["txt"] == "1\n" and out["json"]["reward"] == 1 and out["json"]["max_error"] < 1e-4
    assert out["grade"]["label"] == "pass"


@needs_bwrap
def test_a_wrong_conversion_scores_zero_with_its_label(exported, tmp_path):
    inst = make_instance(10, 4)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, **convert(inst.files, inst.args, inst.config, "conv_channels", inst.optimizer))
    solve = ["cp", "/solution/wrong.npz", GRADED_FILE]
    task_dir = tmp_path / "task"
    shutil.copytree(exported[1], task_dir)
    shutil.copy(wrong, task_dir / "solution" / "wrong.npz")
    out = run_agent_then_verifier(task_dir, tmp_path, solve)
    assert out["txt"] == "0\n" and out["json"]["reward"] == 0 and out["json"]["max_error"] > 1
    assert out["grade"]["label"] == "conv_channels"


@needs_bwrap
def test_a_decompression_bomb_scores_zero_with_its_label(exported, tmp_path):
    """The 2 KiB bz2 bomb (3 GiB inflated) as the artifact, graded in the verifier's container."""
    task_dir = tmp_path / "task"
    shutil.copytree(exported[0], task_dir)
    (task_dir / "solution" / "bomb.npz").write_bytes(bz2_bomb())
    out = run_agent_then_verifier(task_dir, tmp_path, ["cp", "/solution/bomb.npz", GRADED_FILE])
    assert out["txt"] == "0\n" and out["json"] == {"reward": 0}
    assert out["grade"]["label"] == "unreadable" and "zip method 12" in out["grade"]["detail"]


@needs_bwrap
def test_no_artifact_scores_zero(exported, tmp_path):
    out = run_agent_then_verifier(exported[0], tmp_path, None)
    assert out["txt"] == "0\n" and out["json"] == {"reward": 0} and out["grade"]["label"] == "unreadable"


@pytest.mark.skipif(shutil.which("harbor") is None,
                    reason="harbor CLI not on PATH (it needs Python 3.12+; .ci/run installs it where it can)")
def test_harbor_lint_passes(exported):
    r = subprocess.run(["harbor", "lint", *map(str, exported)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_verifier_image_holds_no_sandbox_code(exported):
    grader = {p.name for p in (exported[0] / "tests" / "grader").rglob("*.py")}
    assert "grader.py" in grader and not grader & {"tools.py", "limits.py", "main.py", "scripted_api.py"}


def test_the_export_command_line(tmp_path):
    r = subprocess.run([sys.executable, "harbor_export.py", str(tmp_path), "--level", "6", "--seeds", "2-3"],
                       cwd=ROOT, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "level-6-seed-2", "level-6-seed-3"]
    bad = subprocess.run([sys.executable, "harbor_export.py", str(tmp_path / "new"), "--seeds", "3-1"],
                         cwd=ROOT, capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "A-B with 0 <= A <= B" in bad.stderr
    again = [sys.executable, "harbor_export.py", str(tmp_path), "--level", "6", "--seeds", "5"]
    used = subprocess.run(again, cwd=ROOT, capture_output=True, text=True, check=False)
    assert used.returncode == 2 and "already holds files" in used.stderr and "--replace" in used.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "level-6-seed-2", "level-6-seed-3"]  # untouched
    replaced = subprocess.run([*again, "--replace"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert replaced.returncode == 0, replaced.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "level-6-seed-5"]


def test_the_verifier_never_waits_on_a_fifo(tmp_path):
    """A FIFO (or anything not a regular file) at the artifact path is a failure, at once."""
    fifo = tmp_path / "converted.npz"
    os.mkfifo(fifo)
    r = subprocess.run([sys.executable, "harbor_export.py", str(tmp_path / "logs"), "--level", "1", "--seeds", "0",
                        "--verify", str(fifo)], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    grade = json.loads((tmp_path / "logs" / "grade.json").read_text())
    assert grade["label"] == "unreadable" and "not a regular file" in grade["detail"]
    assert (tmp_path / "logs" / "reward.txt").read_text() == "0\n"
