"""A sweep's records: the Run, results.jsonl (a line per finished run, read back by --resume),
config.json, and the task_version each of them carries."""
import argparse
import hashlib
import json
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

from report import USAGE_KEYS

RESULTS = "results.jsonl"  # one line per finished run, appended as it ends
SCHEMA_VERSION = 2  # of config.json, results.jsonl and summary.json
ROOT = Path(__file__).resolve().parent
# The files that make the task: instances, prompt, tools, sandbox, grader. Runs compare only under one version.
TASK_FILES = ("task.py", "grader.py", "conversions.py", "tools.py", "limits.py", "data/source_model.py",
              "data/source_gdn.py", "data/target_model.py", "data/megatron_checkpoint.py")


@dataclass
class Run:
    run_id: int
    seed: int
    level: int
    outcome: str = "error"  # pass | fail | error (infrastructure) | stopped (cap or fatal API error): last two not graded
    label: str = "harness_error"  # the grader's label, or why the run ended without a grade
    detail: str = ""
    max_error: float | None = None
    steps: int = 0
    usage: dict[str, int] = field(default_factory=lambda: dict.fromkeys(USAGE_KEYS, 0))
    seconds: float = 0.0
    messages: list = field(default_factory=list)
    step_log: list = field(default_factory=list)
    started_at: str = ""  # UTC, ISO 8601
    ended_at: str = ""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@cache
def task_version() -> str:
    """A hash of TASK_FILES: what --resume compares, and what each record carries."""
    digest = hashlib.sha256()
    for name in TASK_FILES:
        digest.update(name.encode() + b"\0" + (ROOT / name).read_bytes())
    return digest.hexdigest()[:16]


def measured_model(opts: argparse.Namespace) -> str:
    """The model a record names: offline, the replies are scripted and no model is measured."""
    return "scripted" if opts.offline else opts.model


def write_config(opts: argparse.Namespace, flags: tuple[str, ...]) -> None:
    """config.json: what the sweep ran (these flags), under which task code; --resume restores it."""
    config = {"schema": SCHEMA_VERSION, "task_version": task_version(), **{k: getattr(opts, k) for k in flags}}
    (opts.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def append(opts: argparse.Namespace, run: Run) -> None:
    """Add a finished run's line to results.jsonl: the run without its messages (transcript.json has them)."""
    graded = run.outcome in ("pass", "fail")
    record = {"schema": SCHEMA_VERSION, "task_version": task_version(), "model": measured_model(opts),
              "max_tokens": opts.max_tokens, "thinking": opts.thinking, "max_steps": opts.max_steps,
              "reward": float(run.outcome == "pass") if graded else None,
              **{k: v for k, v in asdict(run).items() if k != "messages"}}
    with open(opts.out / RESULTS, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def recorded_runs(out: Path) -> list[Run]:
    """Every run recorded in out/results.jsonl, in order (none if it does not exist). A line that
    is not a whole record (a crash cut it short) is skipped with a warning: that run is redone."""
    path, runs = out / RESULTS, []
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            run = Run(**{k: v for k, v in record.items() if k in Run.__dataclass_fields__})
            if not (isinstance(run.level, int) and isinstance(run.seed, int) and isinstance(run.usage, dict)):
                raise TypeError("a field of the wrong type")
            run.usage = {k: int(run.usage.get(k) or 0) for k in USAGE_KEYS}
        except (ValueError, TypeError, AttributeError) as e:
            print(f"{path}, line {number}: not a whole record ({type(e).__name__}); that run is redone", file=sys.stderr)
            continue
        runs.append(run)
    return runs


def latest(runs: list[Run]) -> list[Run]:
    """Each run's latest record: a run started over is recorded again under its number."""
    return list({r.run_id: r for r in runs}.values())
