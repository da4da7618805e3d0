"""Export task instances as Harbor task directories, and grade one inside Harbor's verifier.

    python harbor_export.py DIR --level 7 --seeds 0-9

DIR must be new or empty (--replace clears it first: Harbor runs every task it finds there).
One directory per (level, seed), from the same generator, prompt and grader as main.py:
- environment/: the agent's image, holding only the instance's workspace and numpy.
- tests/: a separate verifier image with the grader and the code that rebuilds the original
  model; Harbor stages it only after the agent has stopped, and the agent's environment never
  holds it. Only /app/converted.npz is carried over (an artifact), so nothing the agent left
  running or changed in its own container can touch grading.
- solution/: the reference conversion, for `harbor run -a oracle`.
"""
import argparse
import json
import math
import os
import shutil
import stat
import tempfile
from pathlib import Path

import numpy as np

import task
from grader import Grade, grade

ROOT = Path(__file__).resolve().parent
GRADED_FILE = "/app/converted.npz"
# What the grader needs in the verifier image: the grader, the instance generator and both models.
GRADER_FILES = ["grader.py", "bounded.py", "task.py", "instances.py", "diagnosis.py", "conversions.py", "harbor_export.py", "data/__init__.py",
                "data/source_model.py", "data/source_gdn.py", "data/target_model.py", "data/megatron_checkpoint.py"]
BASE_IMAGE = "python:3.11-slim-bookworm"  # the Python line the project is tested on
AGENT_TIMEOUT_S = 3600  # our own loop allows 40 replies with up to 60 s of tool time each
VERIFIER_TIMEOUT_S = 300  # grading takes under a second; Python and numpy start in a few


def seed_range(text: str) -> range:
    """argparse type: 'A-B' or 'A', with 0 <= A <= B."""
    first, _, last = text.partition("-")
    if not (first.isdigit() and (last or first).isdigit()) or int(last or first) < int(first):
        raise argparse.ArgumentTypeError(f"must be A-B with 0 <= A <= B, got {text!r}")
    return range(int(first), int(last or first) + 1)


def task_toml(level: int, seed: int) -> str:
    return f"""\
schema_version = "1.4"
artifacts = ["{GRADED_FILE}"]

[task]
name = "megatron-port/level-{level}-seed-{seed}"
version = "1.0.0"
description = "Port a Megatron-Core checkpoint to a Hugging Face-style runtime; graded on logits."
keywords = ["checkpoint-conversion", "megatron-core", "numpy"]

[metadata]
level = {level}
seed = {seed}
difficulty = "level {level} of {max(task.LEVELS)}"

[verifier]
timeout_sec = {VERIFIER_TIMEOUT_S:.1f}
environment_mode = "separate"

[agent]
timeout_sec = {AGENT_TIMEOUT_S:.1f}
user = "agent"

[environment]
network_mode = "no-network"
build_timeout_sec = 600.0
cpus = 1
memory_mb = 4096
storage_mb = 2048
"""


def dockerfile(copy: str) -> str:
    return f"""\
FROM {BASE_IMAGE}
RUN pip install --no-cache-dir numpy=={np.__version__}
{copy}
"""


def export_one(out: Path, level: int, seed: int) -> Path:
    directory = out / f"level-{level}-seed-{seed}"
    workspace = directory / "environment" / "workspace"
    task.write_workspace(workspace, task.make_instance(level, seed))
    (directory / "task.toml").write_text(task_toml(level, seed))
    (directory / "instruction.md").write_text(task.build_prompt(level, None, GRADED_FILE))
    (directory / "environment" / "Dockerfile").write_text(dockerfile(
        "RUN useradd --create-home agent\nWORKDIR /app\nCOPY --chown=agent:agent workspace/ /app/\nUSER agent"))
    tests = directory / "tests"
    for name in GRADER_FILES:
        (tests / "grader" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tests / "grader" / name)
    (tests / "Dockerfile").write_text(dockerfile("WORKDIR /tests\nCOPY . /tests/"))
    (tests / "test.sh").write_text(
        "#!/bin/bash\n# Grades the collected artifact with the project's grader; writes reward.txt and reward.json.\n"
        f"python3 /tests/grader/harbor_export.py /logs/verifier --verify {GRADED_FILE} --level {level} "
        f"--seeds {seed}\n")
    (directory / "solution").mkdir()
    shutil.copy(ROOT / "conversions.py", directory / "solution" / "conversions.py")
    (directory / "solution" / "solve.sh").write_text(
        "#!/bin/bash\n# The reference conversion.\nset -euo pipefail\ncd /app\n"
        "python3 -c \"import sys; sys.path.insert(0, '/solution'); from conversions import convert_workspace; "
        f"convert_workspace('{GRADED_FILE}')\"\n")
    for script in (tests / "test.sh", directory / "solution" / "solve.sh"):
        script.chmod(0o755)
    return directory


def export(out: Path, level: int, seeds: range) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [export_one(out, level, seed) for seed in seeds]
    listing = "\n".join(f"- `{d.name}`: `megatron-port/{d.name}`" for d in written)
    (out / "README.md").write_text(
        f"# megatron-port, level {level}\n\nHarbor tasks exported by `python harbor_export.py`, one per "
        f"seed. The agent writes `{GRADED_FILE}`; a separate verifier grades it on logits (reward 1 or 0).\n\n"
        f"{listing}\n")
    return written


def verify(submission: Path, level: int, seed: int, out: Path) -> None:
    """Grade the artifact; write reward.txt, reward.json (numbers only, as Harbor requires) and grade.json."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:  # grade a copy: never the path the agent controlled
        copy = Path(tmp) / "submission.npz"
        try:  # non-blocking, so that a FIFO or a device at the path cannot stall the verifier
            fd = os.open(submission, os.O_RDONLY | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as f:
                if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    copy.write_bytes(f.read(task.MAX_SUBMISSION_BYTES + 1))
        except OSError:
            pass
        g = grade(copy, level, seed) if copy.exists() else \
            Grade(False, "unreadable", None, f"{submission} is missing or not a regular file")
    reward = int(g.passed)
    error = g.max_error if g.max_error is not None and math.isfinite(g.max_error) else None
    (out / "reward.txt").write_text(f"{reward}\n")
    (out / "reward.json").write_text(json.dumps({"reward": reward} | ({"max_error": error} if error is not None else {})))
    (out / "grade.json").write_text(json.dumps({"passed": g.passed, "label": g.label, "max_error": error,
                                                "detail": g.detail}) + "\n")
    print(f"{'PASS' if g.passed else 'FAIL'} {g.label}: {g.detail}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Write one Harbor task directory per seed into DIR; with --verify, "
                                                 "grade an artifact as the exported verifier does, into DIR.")
    parser.add_argument("dir", type=Path, metavar="DIR")
    parser.add_argument("--level", type=int, default=task.DEFAULT_LEVEL, choices=sorted(task.LEVELS))
    parser.add_argument("--seeds", type=seed_range, default=range(10), help="A-B or A (default 0-9)")
    parser.add_argument("--verify", type=Path, metavar="SUBMISSION", help="the artifact to grade (one seed)")
    parser.add_argument("--replace", action="store_true", help="clear DIR first if it already holds files")
    a = parser.parse_args()
    if a.verify is None:
        if a.dir.exists() and not a.dir.is_dir():
            parser.error(f"{a.dir} is not a directory")
        if a.dir.exists() and any(a.dir.iterdir()):  # old tasks left beside the new ones would be run with them
            if not a.replace:
                parser.error(f"{a.dir} already holds files; give a new directory, or pass --replace to clear it first")
            shutil.rmtree(a.dir)
        for path in export(a.dir, a.level, a.seeds):
            print(path)
    elif len(a.seeds) != 1:
        parser.error("--verify grades one instance: give one seed")
    else:
        verify(a.verify, a.level, a.seeds[0], a.dir)


if __name__ == "__main__":
    main()
