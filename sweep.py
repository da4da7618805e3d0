"""A sweep's bookkeeping: its flags, the spending cap, results.jsonl and resuming, config.json and
summary.json.

Runs are main.Run records; this module reads only their fields, so that main.py, which
holds the agent loop, can import it.
"""
import argparse
import asyncio
import hashlib
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import report
import report_html
import task
from report import USAGE_KEYS

RESULTS = "results.jsonl"  # one line per finished run, appended as it ends
# What config.json saves and --resume restores; --max-cost alone may be given anew beside --resume.
SWEEP_FLAGS = ("model", "levels", "runs", "seed", "max_steps", "max_tokens", "thinking", "offline", "max_cost")
SCHEMA_VERSION = 2  # of config.json, results.jsonl and summary.json
ROOT = Path(__file__).resolve().parent
# The files that make the task: instances, prompt, tools, sandbox, grader. Runs compare only under one version.
TASK_FILES = ("task.py", "grader.py", "conversions.py", "tools.py", "limits.py", "data/source_model.py",
              "data/source_gdn.py", "data/target_model.py", "data/megatron_checkpoint.py")
Run = Any  # a main.Run record: this module reads its fields only
DEFAULT_MODEL = "claude-haiku-4-5"
DEFAULT_RUNS = 10
DEFAULT_CONCURRENCY = 10
DEFAULT_MAX_TOKENS = 16_000  # per reply: room for a long script plus its explanation
MAX_OUTPUT_TOKENS = 64_000  # claude-haiku-4-5's output limit: the largest --max-tokens the API accepts
UNSET = object()  # a flag not given on the command line
DESCRIPTION = """Measure a model's pass rate on the task: N runs at once, each graded, every transcript kept.

    python main.py --offline          # no key: scripted replies through the real loop
    python main.py --runs 10          # claude-haiku-4-5 through the Anthropic API
"""
DEFAULT_MAX_COST = 6.0  # USD for the whole sweep, the runs a --resume keeps included; covers the default command
# The cost the cap expects of a run before any has finished: a long run, mostly cache reads.
PRIOR_RUN_USAGE = {"input_tokens": 60_000, "output_tokens": 40_000, "cache_creation_input_tokens": 100_000,
                   "cache_read_input_tokens": 1_500_000}


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


def sweep_config(opts: argparse.Namespace) -> dict:
    """config.json: what the sweep ran, under which task code; --resume restores it."""
    return {"schema": SCHEMA_VERSION, "task_version": task_version(), **{k: getattr(opts, k) for k in SWEEP_FLAGS}}


class Sweep:
    """One invocation's runs as they end: the spending cap, results.jsonl, progress and report.html."""

    def __init__(self, opts: argparse.Namespace, planned: int, isolation: str, previous: list[Run] = (),
                 spent_before: float = 0.0):
        self.opts, self.planned, self.isolation = opts, planned, isolation
        self.done: list[Run] = list(previous)
        self.spent_before = spent_before  # what the runs a --resume starts over had already cost
        self.in_flight: dict[int, Run] = {}
        self.changed = asyncio.Condition()  # a run ended: the cap may now allow another
        self.skipped = 0
        self.fatal: str | None = None  # why the API cannot serve the sweep, once a run has met that
        self.started, self.started_at = time.monotonic(), now()

    def cost(self, run: Run) -> float:
        return 0.0 if self.opts.offline else report.estimated_cost(self.opts.model, run.usage) or 0.0

    def run_cost(self) -> tuple[float | None, bool]:
        """What a run costs, and whether that was measured: the mean of the finished runs that sent a request, or,
        before any, a run of PRIOR_RUN_USAGE; None offline and for a model without a price."""
        if self.opts.offline or report.price(self.opts.model) is None:
            return None, False
        costs = [self.cost(r) for r in self.done if r.steps]
        if costs:
            return sum(costs) / len(costs), True
        return report.estimated_cost(self.opts.model, PRIOR_RUN_USAGE), False

    def expected_run_cost(self) -> float:
        return self.run_cost()[0] or 0.0

    def spent(self) -> float:
        return self.spent_before + sum(self.cost(r) for r in [*self.done, *self.in_flight.values()])

    def capped(self) -> bool:
        return not self.opts.offline and self.opts.max_cost > 0

    def may_send(self) -> bool:
        """The cap bounds spend: no request is sent once the spend so far has reached it. So a sweep
        passes the cap by at most the requests in flight when it is reached, one per running run.
        A fatal API error (a bad key, an unknown model, no answer at all) stops every request at once."""
        return self.fatal is None and (not self.capped() or self.spent() < self.opts.max_cost)

    def stop(self) -> tuple[str, str] | None:
        """Why a run must send no further request, as (label, detail), or None."""
        if self.fatal is not None:
            return "api_fatal", self.fatal
        if not self.may_send():
            return "spending_cap", f"the sweep's spend reached --max-cost ${self.opts.max_cost:.2f}"
        return None

    def room_for_one_more(self) -> bool:
        """How many runs go at once: the spend so far, what the runs in flight are still expected to
        cost, and one more run, within the cap. With none in flight one run may always start."""
        if not self.capped() or not self.in_flight:
            return self.may_send()
        mean = self.expected_run_cost()
        expected = sum(max(0.0, mean - self.cost(r)) for r in self.in_flight.values()) + mean
        return self.spent() + expected <= self.opts.max_cost

    async def start(self, run: Run) -> bool:
        """Start `run` once there is room, waiting for runs in flight to end (their costs then
        replace the estimate); False, and the run is skipped, once the spend has reached the cap."""
        async with self.changed:
            while self.in_flight and not self.room_for_one_more():
                await self.changed.wait()
            if not self.room_for_one_more():
                self.skipped += 1
                return False
            self.in_flight[run.run_id] = run
            return True

    async def finished(self, run: Run) -> None:
        async with self.changed:  # moved from in flight to done at once, so that the spend is never undercounted
            self.in_flight.pop(run.run_id, None)
            self.done.append(run)
            if run.label == "api_fatal" and self.fatal is None:
                self.fatal = run.detail
            self.changed.notify_all()
        self.record(run)

    def record(self, run: Run) -> None:
        """Write down a finished run: results.jsonl, the progress line, report.html."""
        graded = run.outcome in ("pass", "fail")
        record = {"schema": SCHEMA_VERSION, "task_version": task_version(), "model": measured_model(self.opts),
                  "max_tokens": self.opts.max_tokens, "thinking": self.opts.thinking, "max_steps": self.opts.max_steps,
                  "reward": float(run.outcome == "pass") if graded else None,
                  **{k: v for k, v in asdict(run).items() if k != "messages"}}
        with open(self.opts.out / RESULTS, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
        print(f"{report.run_line(run)} | {len(self.done)}/{self.planned} done; {report.tally(self.done, self.opts.levels)}; "
              f"spent ${self.spent():.2f}", flush=True)
        try:
            report_html.write_report(self.opts.out, self.summary(), self.done)
        except OSError as e:
            print(f"run {run.run_id:03d}: could not write the report: {e}", file=sys.stderr)

    def summary(self) -> dict:
        opts, runs = self.opts, self.done
        overall = report.level_row(None, runs, opts.model, opts.offline)  # every level together
        rows = [report.level_row(lv, [r for r in runs if r.level == lv], opts.model, opts.offline) for lv in opts.levels]
        usage = sum((Counter(r.usage) for r in runs), Counter())
        rate, cost = overall["rate"], overall["cost_usd"]
        return {
            "schema": SCHEMA_VERSION, "task_version": task_version(), "model": measured_model(opts),
            "levels_swept": opts.levels, "runs_per_level": None if opts.offline else opts.runs, "out": str(opts.out),
            "seed": opts.seed, "offline": opts.offline, "thinking_budget": opts.thinking, "max_tokens": opts.max_tokens,
            "max_steps": opts.max_steps, "started_at": self.started_at, "ended_at": now(),
            "runs_planned": self.planned, "runs_finished": len(runs), "skipped": self.skipped,
            "skipped_reason": "" if not self.skipped else self.fatal if self.fatal else
            f"the spend reached the cap of ${opts.max_cost:.2f} (--max-cost)",
            "stopped": sum(r.outcome == "stopped" for r in runs), "spent_usd": round(self.spent(), 4),
            "max_cost_usd": opts.max_cost if self.capped() else None,
            "graded": overall["graded"], "passes": overall["passes"], "pass_rate": rate, "wilson_95": overall["wilson_95"],
            "target_band": list(report.TARGET_BAND),
            "in_target_band": None if opts.offline else rate is not None and
            report.TARGET_BAND[0] <= rate <= report.TARGET_BAND[1],
            "levels": rows, "recommendation": "offline: the replies are scripted, so no level is recommended"
            if opts.offline else report.recommend(rows, opts.runs, sorted(task.LEVELS), report.next_flags(opts),
                                                  *self.run_cost()),
            "failures": overall["failures"],
            "errors": dict(Counter(r.label for r in runs if r.outcome == "error").most_common()),
            "tokens": {"input": usage["input_tokens"], "output": usage["output_tokens"],
                       "cache_write": usage["cache_creation_input_tokens"], "cache_read": usage["cache_read_input_tokens"]},
            "estimated_cost_usd": cost,
            "cost_text": "none (scripted)" if opts.offline else "unknown for this model" if cost is None else
            f"${self.spent():.2f}" + (f" of the ${opts.max_cost:.2f} cap" if self.capped() else " (no cap)"),
            "wall_seconds": round(time.monotonic() - self.started, 1), "isolation": self.isolation,
        }


def restore(p: argparse.ArgumentParser, opts: argparse.Namespace, given: set[str]) -> None:
    """Take the sweep's saved flags from its config.json. A flag given again must agree with the
    saved one, except --max-cost, which is replaced; a key missing from the file gets its default."""
    try:
        saved = json.loads((opts.resume / "config.json").read_text())
    except (OSError, ValueError) as e:
        p.error(f"--resume {opts.resume}: cannot read its config.json ({e})")
    if not isinstance(saved, dict):
        p.error(f"--resume {opts.resume}: its config.json is not a JSON object")
    if saved.get("task_version") != task_version():
        p.error(f"--resume {opts.resume}: its runs were made with other task code (task_version "
                f"{saved.get('task_version')!r}, now {task_version()!r}), so they would not compare; start a new sweep")
    if "out" in given:
        p.error("--resume DIR writes into DIR: drop --out")
    missing = [k for k in SWEEP_FLAGS if k not in saved]
    if missing:
        print(f"--resume {opts.resume}: config.json has no {', '.join(missing)}; using the default", file=sys.stderr)
    values = {k: saved.get(k, p.get_default(k)) for k in SWEEP_FLAGS}
    values["levels"] = values["levels"] or [task.DEFAULT_LEVEL]
    given = given | {"levels"} if "level" in given else given  # --level N stands for --levels N
    differ = [k for k in given & set(SWEEP_FLAGS) - {"max_cost"} if getattr(opts, k) != values[k]]
    if differ:
        p.error(f"--resume {opts.resume} runs the saved sweep; these flags differ from it: "
                + ", ".join(f"--{k.replace('_', '-')} (saved {values[k]!r})" for k in differ)
                + ". Drop them, or start a new sweep.")
    new_cap = opts.max_cost if "max_cost" in given else values["max_cost"]
    vars(opts).update(values, max_cost=new_cap, out=opts.resume)


def kept_runs(opts: argparse.Namespace, make: Callable[..., Run]) -> tuple[list[Run], float]:
    """What a --resume keeps: the latest record of each run that passed or failed (the rest start
    over), and what every other record had already spent, which still counts against the cap."""
    records = recorded_runs(opts.out, make) if opts.resume else []
    latest = {r.run_id: r for r in records}  # a run started over is recorded again
    previous = [r for r in latest.values() if r.outcome in ("pass", "fail")]
    kept = {id(r) for r in previous}
    spent = 0.0 if opts.offline else sum(report.estimated_cost(opts.model, r.usage) or 0.0 for r in records
                                         if id(r) not in kept)
    return previous, spent


def recorded_runs(out: Path, make: Callable[..., Run]) -> list[Run]:
    """Every run recorded in out/results.jsonl, in order (none if it does not exist). A line that
    is not a whole record (a crash cut it short) is skipped with a warning: that run is redone."""
    path, runs = out / RESULTS, []
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            run = make(**{k: v for k, v in record.items() if k in make.__dataclass_fields__})
            if not (isinstance(run.level, int) and isinstance(run.seed, int) and isinstance(run.usage, dict)):
                raise TypeError("a field of the wrong type")
            run.usage = {k: int(run.usage.get(k) or 0) for k in USAGE_KEYS}
        except (ValueError, TypeError, AttributeError) as e:
            print(f"{path}, line {number}: not a whole record ({type(e).__name__}); that run is redone", file=sys.stderr)
            continue
        runs.append(run)
    return runs


def parse_levels(text: str) -> list[int]:
    """'4-6' or '6,4,4' -> [4, 5, 6] or [4, 6]."""
    try:
        if "-" in text:
            first, last = (int(x) for x in text.split("-", 1))
            levels = list(range(first, last + 1))
        else:
            first, last, levels = 0, 0, [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"levels are A-B or A,B,...; got {text!r}")
    if first > last:
        raise argparse.ArgumentTypeError(f"A-B goes from the lower level to the higher; got {text!r} "
                                         f"(did you mean {last}-{first}?)")
    return check_levels(levels, text)


def check_levels(levels, text: str | None = None) -> list[int]:
    """The one place levels are validated: a non-empty list of known levels, sorted, each once."""
    if not isinstance(levels, list) or not levels or any(lv not in task.LEVELS for lv in levels):
        raise argparse.ArgumentTypeError(f"levels must lie in {min(task.LEVELS)}-{max(task.LEVELS)}; "
                                         f"got {text if text is not None else levels!r}")
    return sorted(set(levels))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="main.py", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=DEFAULT_RUNS, help=f"runs per level (default {DEFAULT_RUNS})")
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                   help=f"runs at once (default {DEFAULT_CONCURRENCY})")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"default {DEFAULT_MODEL}")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--level", type=int, choices=sorted(task.LEVELS),
                       help=f"difficulty, 1 (easiest) to {max(task.LEVELS)} (default {task.DEFAULT_LEVEL})")
    which.add_argument("--levels", type=parse_levels, help="a sweep over levels, A-B or A,B,...; runs interleaved")
    p.add_argument("--seed", type=task.non_negative, default=0,
                   help="base instance seed; run i of a level uses seed + i (default 0)")
    p.add_argument("--max-steps", type=int, default=task.DEFAULT_MAX_STEPS,
                   help=f"model replies per run (default {task.DEFAULT_MAX_STEPS})")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"max_tokens per reply (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--thinking", type=int, default=0, metavar="TOKENS",
                   help="extended thinking with this budget per reply, at least 1024 and below --max-tokens "
                        "(default 0: off)")
    p.add_argument("--max-cost", type=non_negative_usd, default=DEFAULT_MAX_COST,
                   help=f"USD for the whole sweep: no request is sent once the spend reaches it, so it is passed by at "
                        f"most the requests in flight; 0 for no cap (default {DEFAULT_MAX_COST:g})")
    p.add_argument("--out", type=Path, help="output directory (default runs/<timestamp>-<4 hex digits>/)")
    p.add_argument("--resume", type=Path, metavar="DIR",
                   help=f"finish the sweep in DIR with its saved flags, keeping the passes and fails in its {RESULTS} "
                        "(other runs start over); only --max-cost may be given anew")
    p.add_argument("--offline", action="store_true",
                   help="no API key: scripted replies submit the reference and every known wrong conversion")
    p.add_argument("--allow-unisolated", action="store_true",
                   help="against the API, run model code as plain processes when bubblewrap cannot isolate it "
                        "(refused by default; --offline always may)")
    p.add_argument("--keep-workspaces", action="store_true",
                   help="keep each run's workspace and, offline, its scripted submission (by default removed when "
                        "the run ends; the transcript and a model's submitted file stay)")
    p.add_argument("--verbose", action="store_true", help="print every tool call as it happens")
    flags = (*SWEEP_FLAGS, "level", "out")
    opts = p.parse_args(argv, argparse.Namespace(**dict.fromkeys(flags, UNSET)))  # argparse keeps what is set
    given = {k for k in flags if getattr(opts, k) is not UNSET}
    vars(opts).update({k: p.get_default(k) for k in flags if k not in given})
    if opts.level is not None:
        opts.levels = [opts.level]
    if opts.resume:
        restore(p, opts, given)
    opts.levels = opts.levels or [task.DEFAULT_LEVEL]
    try:
        for flag in ("runs", "concurrency", "max_steps", "max_tokens"):
            if getattr(opts, flag) < 1:
                p.error(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(opts, flag)}")
        if opts.max_tokens > MAX_OUTPUT_TOKENS:
            p.error(f"--max-tokens must be at most {MAX_OUTPUT_TOKENS}, the model's output limit; got {opts.max_tokens}")
        opts.levels = check_levels(opts.levels)
        if opts.seed < 0:
            p.error(f"--seed must be non-negative, got {opts.seed}")
    except (TypeError, argparse.ArgumentTypeError) as e:
        p.error(f"--resume {opts.resume}: config.json holds a value that is not valid ({e})" if opts.resume else
                f"--levels: {e}")
    if opts.thinking and not 1024 <= opts.thinking < opts.max_tokens:  # what the Messages API accepts
        p.error(f"--thinking must be at least 1024 and below --max-tokens ({opts.max_tokens}), or 0 for off")
    if opts.out is None:  # unique even for two sweeps started in the same second
        opts.out = Path("runs") / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
    elif not opts.resume and opts.out.exists() and (not opts.out.is_dir() or any(opts.out.iterdir())):
        p.error(f"--out {opts.out} already holds files: give a new directory, or --resume {opts.out} to finish "
                "the sweep there")
    return opts


def non_negative_usd(text: str) -> float:  # argparse type for --max-cost
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of dollars, 0 or more; got {text!r}")
    return value
