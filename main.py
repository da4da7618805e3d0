"""Measure a model's pass rate on the task: N runs at once, each graded, every transcript kept.

    python main.py --offline          # no key: scripted replies through the real loop
    python main.py --runs 10          # claude-haiku-4-5 through the Anthropic API
"""
import argparse
import asyncio
import hashlib
import json
import math
import os
import shutil
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

import anthropic

import report
import task
from conversions import MISTAKES
from grader import grade
from limits import cgroups_usable, userns_filter
from report import USAGE_KEYS
from tools import (
    MAX_PROCESSES,
    MEMORY_BYTES,
    SANDBOX_WORKSPACE,
    Sandbox,
    SubmitError,
    bwrap_usable,
    copy_submission,
    resolve_submission,
)

DEFAULT_MODEL = "claude-haiku-4-5"
DEFAULT_RUNS = 10
DEFAULT_CONCURRENCY = 10
DEFAULT_MAX_TOKENS = 16_000  # per reply: room for a long script plus its explanation
MAX_OUTPUT_TOKENS = 64_000  # claude-haiku-4-5's output limit: the largest --max-tokens the API accepts
# Transient API errors (429, 5xx, overloaded, connection failures) are retried by this loop, not the
# SDK's: each wait honours retry-after, else doubles from 1 s up to MAX_BACKOFF_S, and a step gives up
# (the run becomes an api_error) once its waits would pass RETRY_BUDGET_S.
RETRY_BUDGET_S = 600.0
MAX_BACKOFF_S = 60.0
TRANSIENT = (anthropic.RateLimitError, anthropic.InternalServerError, anthropic.APIConnectionError,
             anthropic.ConflictError, anthropic.RequestTimeoutError)
DEFAULT_MAX_COST = 6.0  # USD for the whole sweep, the runs a --resume keeps included; covers the default command
# The cost the cap expects of a run before any has finished: a long run, mostly cache reads.
PRIOR_RUN_USAGE = {"input_tokens": 60_000, "output_tokens": 40_000, "cache_creation_input_tokens": 100_000,
                   "cache_read_input_tokens": 1_500_000}
LABEL_WIDTH = max(map(len, MISTAKES))  # the longest label there is, so the console keeps its columns
RESULTS = "results.jsonl"  # one line per finished run, appended as it ends
# Where the harness cannot make cgroups (a normal user on cgroup v2), this bounds the whole sweep instead.
SYSTEMD_SCOPE = "systemd-run --user --scope -p MemoryMax=16G -p TasksMax=1024"
# What config.json saves and --resume restores; --max-cost alone may be given anew beside --resume.
SWEEP_FLAGS = ("model", "levels", "runs", "seed", "max_steps", "max_tokens", "thinking", "offline", "max_cost")
UNSET = object()  # a flag not given on the command line
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
    outcome: str = "error"  # pass | fail | error (infrastructure) | stopped (the spending cap): the last two not graded
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


def sweep_config(opts: argparse.Namespace) -> dict:
    """config.json: what the sweep ran, under which task code; --resume restores it."""
    return {"schema": SCHEMA_VERSION, "task_version": task_version(), **{k: getattr(opts, k) for k in SWEEP_FLAGS}}


def with_cache_breakpoint(messages: list[dict]) -> list[dict]:
    """The request's messages, the newest block marked so the whole prefix is cached."""
    last = messages[-1]
    content = last["content"]
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
    blocks[-1] = {**blocks[-1], "cache_control": {"type": "ephemeral"}}
    return [*messages[:-1], {**last, "content": blocks}]


def as_param(block) -> dict:
    """A response block as it is sent back in the conversation."""
    if block.type == "tool_use":
        return {"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}
    if block.type == "text":
        return {"type": "text", "text": block.text}
    return block.model_dump(exclude_none=True)


def tool_result(use_id: str, output: str, is_error: bool = False) -> dict:
    return {"type": "tool_result", "tool_use_id": use_id, "content": output, "is_error": is_error}


class SweepStopped(Exception):
    """No further request may be sent: SweepStopped(label, detail), the spending cap or a fatal API error."""


def conversation_too_long(e: anthropic.APIStatusError) -> bool:
    """A 400 or 413 that the conversation's size caused: the model's doing, not the harness's."""
    return e.status_code == 413 or e.status_code == 400 and "prompt is too long" in str(e)


async def wait_before_retry(seconds: float) -> None:
    await asyncio.sleep(seconds)


async def create_message(client, request: dict):
    """One reply, streamed (so any max_tokens the API accepts works), transient errors retried."""
    waited, backoff = 0.0, 1.0
    while True:
        try:
            async with client.messages.stream(**request) as stream:
                return await stream.get_final_message()
        except TRANSIENT as e:
            response = getattr(e, "response", None)
            after = response.headers.get("retry-after") if response is not None else None
            try:
                wait = min(MAX_BACKOFF_S, max(0.0, float(after)))
            except (TypeError, ValueError):
                wait = backoff
            if waited + wait > RETRY_BUDGET_S:
                raise
            await wait_before_retry(wait)
            waited, backoff = waited + wait, min(MAX_BACKOFF_S, backoff * 2)


async def run_agent(run: Run, client, sandbox: Sandbox, opts: argparse.Namespace,
                    stop: Callable[[], tuple[str, str] | None] = lambda: None) -> Path | None:
    """The agent loop. Returns the submitted file (a copy outside the workspace) or None.
    Before each request it asks `stop` (the spending cap, a fatal API error) and stops the run if told."""
    run.messages.append({"role": "user", "content": task.build_prompt(run.level, opts.max_steps)})
    for step in range(1, opts.max_steps + 1):
        if why := stop():
            raise SweepStopped(*why)
        started = time.monotonic()
        # Extended thinking, when asked for: its blocks go back unchanged in the conversation (as_param).
        thinking = {"thinking": {"type": "enabled", "budget_tokens": opts.thinking}} if opts.thinking else {}
        response = await create_message(client, {"model": opts.model, "max_tokens": opts.max_tokens, "tools": task.TOOLS,
                                                  "messages": with_cache_breakpoint(run.messages), **thinking})
        run.steps = step
        usage = {k: getattr(response.usage, k) or 0 for k in USAGE_KEYS}
        run.usage = {k: run.usage[k] + usage[k] for k in USAGE_KEYS}
        run.step_log.append({"step": step, "stop_reason": response.stop_reason, "usage": usage,
                             "api_seconds": round(time.monotonic() - started, 3)})
        run.messages.append({"role": "assistant", "content": [as_param(b) for b in response.content]})
        if response.stop_reason == "pause_turn":  # the API paused a long turn: send it back to be continued
            continue
        uses = [b for b in response.content if b.type == "tool_use"]
        cut_off = response.stop_reason == "max_tokens"
        if not (cut_off or response.stop_reason == "tool_use" and uses):
            run.label = {"end_turn": "no_submission", "stop_sequence": "no_submission", "refusal": "refusal",
                         "model_context_window_exceeded": "context_overflow"}.get(response.stop_reason,
                                                                                  f"stop_{response.stop_reason}")
            if response.stop_details is not None:
                run.detail = f"stop_details: {json.dumps(response.stop_details.model_dump(exclude_none=True))}"
            return None
        started = time.monotonic()
        results = []
        for use in uses:
            if cut_off and use is response.content[-1]:  # the block being written when the limit hit
                results.append(tool_result(use.id, "This tool call was cut off by the max_tokens limit and was "
                                                   "not run.", is_error=True))
            elif use.name == "submit":
                try:
                    submission = await take_submission(sandbox, use.input.get("path") if isinstance(use.input, dict) else None)
                except SubmitError as e:
                    results.append(tool_result(use.id, f"Not submitted: {e}.", is_error=True))
                else:
                    if await sandbox.over_quota():  # the worker is stopped: this is final
                        run.label = "disk_quota"
                        return None
                    return submission
            else:
                results.append(tool_result(use.id, *await call_tool(use.name, use.input, sandbox)))
                if sandbox.calls_over_quota >= 2:
                    run.label = "disk_quota"
                    return None
            if opts.verbose:
                print(f"  run {run.run_id:03d} step {step} {use.name}: {results[-1]['content'][:200]!r}")
        run.step_log[-1]["tool_seconds"] = round(time.monotonic() - started, 3)
        if cut_off:
            results.append({"type": "text", "text": f"Your reply was cut off at the max_tokens limit "
                                                    f"({opts.max_tokens}). Continue, in shorter pieces."})
        run.messages.append({"role": "user", "content": results})
    run.label = "max_steps"
    return None


async def take_submission(sandbox: Sandbox, path) -> Path:
    """Stop the worker, then copy the submitted file out of the workspace for grading. Every check
    that can refuse it runs first, while the worker and its variables are still there."""
    copy = sandbox.workspace.parent / "submission.npz"
    copy_submission(resolve_submission(sandbox.workspace, path), copy, task.MAX_SUBMISSION_BYTES)
    await sandbox.close()  # nothing may change the path while it is resolved and copied again, for good
    copy_submission(resolve_submission(sandbox.workspace, path), copy, task.MAX_SUBMISSION_BYTES)
    return copy


async def call_tool(name: str, tool_input, sandbox: Sandbox) -> tuple[str, bool]:
    if name == "python":
        if not isinstance(tool_input, dict) or not isinstance(tool_input.get("code"), str):
            return "python needs an input {\"code\": \"<python source>\"}.", True
        result = await sandbox.run(tool_input["code"])
        return result.output, result.is_error
    return f"Unknown tool {name!r}; the tools are: {', '.join(t['name'] for t in task.TOOLS)}.", True


async def run_one(run: Run, client, opts: argparse.Namespace, isolate: bool,
                  stop: Callable[[], tuple[str, str] | None] = lambda: None) -> Run:
    """One run from workspace to grade. Any failure is recorded on the run, never raised."""
    started, run.started_at = time.monotonic(), now()
    run_dir = opts.out / f"run-{run.run_id:03d}"
    sandbox = None
    try:
        # A run resumed after an interruption starts clean: nothing of the earlier attempt is left.
        await asyncio.to_thread(shutil.rmtree, run_dir, ignore_errors=True)
        instance = await asyncio.to_thread(task.make_instance, run.level, run.seed)
        await asyncio.to_thread(task.write_workspace, run_dir / "workspace", instance)
        sandbox = Sandbox(run_dir / "workspace", isolate=isolate)
        submission = await run_agent(run, client, sandbox, opts, stop)
        if submission is not None:
            g = await asyncio.to_thread(grade, submission, run.level, run.seed)
            outcome = "error" if g.label == "ungradable" else "pass" if g.passed else "fail"
            run.outcome, run.label, run.detail, run.max_error = outcome, g.label, g.detail, g.max_error
        else:
            run.outcome = "fail"
    except SweepStopped as e:
        run.outcome, (run.label, why) = "stopped", e.args
        run.detail = f"stopped before step {run.steps + 1}: {why}"
    except anthropic.APIStatusError as e:
        # A conversation grown too large is the model's doing; a transient error that outlasted the retries
        # costs this run; any other refusal (key, model, permissions, a request the API rejects) is fatal.
        run.outcome, run.label = ("fail", "context_overflow") if conversation_too_long(e) else \
            ("error", "api_error") if isinstance(e, TRANSIENT) else ("error", "api_fatal")
        run.detail = f"{type(e).__name__} ({e.status_code}): {e.message}"
    except anthropic.APIError as e:  # connection failures that outlasted the retries
        run.outcome, run.label, run.detail = "error", "api_error", f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 -- a harness bug must not take the other runs down
        run.outcome, run.label = "error", "harness_error"
        run.detail = "".join(traceback.format_exception(e))
    finally:
        if sandbox is not None:
            await sandbox.close()
        if not opts.keep_workspaces:  # the submitted file (a copy beside it) and the transcript stay
            await asyncio.to_thread(shutil.rmtree, run_dir / "workspace", ignore_errors=True)
        run.seconds, run.ended_at = time.monotonic() - started, now()
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "transcript.json").write_text(json.dumps(asdict(run), indent=1, default=str))
            (run_dir / "transcript.html").write_text(report.transcript_html(run))
        except (OSError, TypeError, ValueError) as e:
            print(f"run {run.run_id:03d}: could not write its transcript: {e}", file=sys.stderr)
    return run


def run_line(run: Run) -> str:
    tokens = f"{run.usage['input_tokens'] + run.usage['cache_read_input_tokens'] + run.usage['cache_creation_input_tokens']}" \
             f"/{run.usage['output_tokens']}"
    return (f"run {run.run_id:03d} L{run.level} seed {run.seed:<6} {run.outcome.upper():7} {run.label:<{LABEL_WIDTH}} "
            f"steps {run.steps:<3} tokens in/out {tokens:<14} {run.seconds:6.1f}s")


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
        self.fatal: str | None = None  # the cause of a fatal API error, once one has ended a run
        self.started, self.started_at = time.monotonic(), now()

    def cost(self, run: Run) -> float:
        return 0.0 if self.opts.offline else report.estimated_cost(self.opts.model, run.usage) or 0.0

    def expected_run_cost(self) -> float:
        """The mean cost of the runs finished so far, or, before any, a run of PRIOR_RUN_USAGE."""
        costs = [self.cost(r) for r in self.done if r.steps]
        return sum(costs) / len(costs) if costs else report.estimated_cost(self.opts.model, PRIOR_RUN_USAGE) or 0.0

    def spent(self) -> float:
        return self.spent_before + sum(self.cost(r) for r in [*self.done, *self.in_flight.values()])

    def capped(self) -> bool:
        return not self.opts.offline and self.opts.max_cost > 0

    def may_send(self) -> bool:
        """The cap bounds spend: no request is sent once the spend so far has reached it. So a sweep
        passes the cap by at most the requests in flight when it is reached, one per running run.
        A fatal API error (a bad key, an unknown model) stops every request at once."""
        return self.fatal is None and (not self.capped() or self.spent() < self.opts.max_cost)

    def stop(self) -> tuple[str, str] | None:
        """Why a run must send no further request, as (label, detail), or None."""
        if self.fatal is not None:
            return "api_fatal", f"the API refused the sweep: {self.fatal}"
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
        record = {"schema": SCHEMA_VERSION, "task_version": task_version(), "model": self.opts.model,
                  "max_tokens": self.opts.max_tokens, "thinking": self.opts.thinking, "max_steps": self.opts.max_steps,
                  "reward": float(run.outcome == "pass") if graded else None,
                  **{k: v for k, v in asdict(run).items() if k != "messages"}}
        with open(self.opts.out / RESULTS, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
        tally = " ".join(f"L{lv} {sum(r.outcome == 'pass' for r in self.done if r.level == lv)}/"
                         f"{sum(r.level == lv for r in self.done)}" for lv in self.opts.levels)
        print(f"{run_line(run)} | {len(self.done)}/{self.planned} done; passes {tally}; spent ${self.spent():.2f}",
              flush=True)
        try:
            report.write_report(self.opts.out, self.summary(), self.done)
        except OSError as e:
            print(f"run {run.run_id:03d}: could not write the report: {e}", file=sys.stderr)

    def summary(self) -> dict:
        opts, runs = self.opts, self.done
        overall = report.level_row(None, runs, opts.model, opts.offline)  # every level together
        rows = [report.level_row(lv, [r for r in runs if r.level == lv], opts.model, opts.offline) for lv in opts.levels]
        usage = sum((Counter(r.usage) for r in runs), Counter())
        rate, cost = overall["rate"], overall["cost_usd"]
        return {
            "schema": SCHEMA_VERSION, "task_version": task_version(), "model": opts.model, "levels_swept": opts.levels,
            "seed": opts.seed, "offline": opts.offline, "thinking_budget": opts.thinking, "max_tokens": opts.max_tokens,
            "max_steps": opts.max_steps, "started_at": self.started_at, "ended_at": now(),
            "runs_planned": self.planned, "runs_finished": len(runs), "skipped": self.skipped,
            "skipped_reason": "" if not self.skipped else f"the API refused the sweep: {self.fatal}" if self.fatal else
            f"the spend reached the cap of ${opts.max_cost:.2f} (--max-cost)",
            "stopped": sum(r.outcome == "stopped" for r in runs), "spent_usd": round(self.spent(), 4),
            "max_cost_usd": opts.max_cost if self.capped() else None,
            "graded": overall["graded"], "passes": overall["passes"], "pass_rate": rate, "wilson_95": overall["wilson_95"],
            "target_band": list(report.TARGET_BAND),
            "in_target_band": rate is not None and report.TARGET_BAND[0] <= rate <= report.TARGET_BAND[1],
            "levels": rows, "recommendation": "offline: the replies are scripted, so no level is recommended"
            if opts.offline else report.recommend(rows, opts.runs, sorted(task.LEVELS), next_flags(opts)),
            "failures": overall["failures"],
            "errors": dict(Counter(r.label for r in runs if r.outcome == "error").most_common()),
            "tokens": {"input": usage["input_tokens"], "output": usage["output_tokens"],
                       "cache_write": usage["cache_creation_input_tokens"], "cache_read": usage["cache_read_input_tokens"]},
            "estimated_cost_usd": cost,
            "cost_text": "none (scripted)" if opts.offline else "unknown for this model" if cost is None else
            f"${self.spent():.2f}" + (f" of the ${opts.max_cost:.2f} cap" if self.capped() else " (no cap)"),
            "wall_seconds": round(time.monotonic() - self.started, 1), "isolation": self.isolation,
        }


def next_flags(opts: argparse.Namespace) -> str:
    """The sweep's flags that a follow-up command must carry (all but the levels and runs it picks)."""
    flags = f" --model {opts.model} --seed {opts.seed} --max-steps {opts.max_steps} --max-tokens {opts.max_tokens}"
    return flags + (f" --thinking {opts.thinking}" if opts.thinking else "") + f" --max-cost {opts.max_cost:g}"


def print_summary(s: dict) -> None:
    print("\n== summary ==")
    if s["runs_finished"] + s["skipped"] < s["runs_planned"]:
        print(f"interrupted: {s['runs_finished']} of {s['runs_planned']} runs finished")
    if s["skipped"]:
        print(f"skipped: {s['skipped']} runs never started: {s['skipped_reason']}")
    if s["stopped"]:
        print(f"stopped: {s['stopped']} runs ended unfinished ({s['skipped_reason'] or 'the sweep stopped'}), neither "
              "pass nor fail (not in the pass rate); --resume starts them over")
    report.print_table(s)
    if s["errors"]:
        print(f"errors (not in the pass rate): {sum(s['errors'].values())} "
              + ", ".join(f"{k} {v}" for k, v in s["errors"].items()))
    t = s["tokens"]
    print(f"tokens: input {t['input']}, output {t['output']}, cache write {t['cache_write']}, "
          f"cache read {t['cache_read']}; estimated cost {s['cost_text']}")
    thinking = f"{s['thinking_budget']} tokens" if s["thinking_budget"] else "off"
    print(f"wall time {s['wall_seconds']}s; extended thinking {thinking}; sandbox: {s['isolation']}")


async def run_all(runs: list[Run], clients: list, opts: argparse.Namespace, isolate: bool, sweep: Sweep) -> None:
    limit = asyncio.Semaphore(opts.concurrency)

    async def guarded(run: Run, client) -> None:
        async with limit:
            if not await sweep.start(run):
                return
            finished = await run_one(run, client, opts, isolate, sweep.stop)
        await sweep.finished(finished)

    await asyncio.gather(*(guarded(run, client) for run, client in zip(runs, clients, strict=True)))


def parse_levels(text: str) -> list[int]:
    """'4-6' or '6,4,4' -> [4, 5, 6] or [4, 6]."""
    try:
        if "-" in text:
            first, last = (int(x) for x in text.split("-", 1))
            levels = list(range(first, last + 1))
        else:
            levels = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"levels are A-B or A,B,...; got {text!r}")
    return check_levels(levels, text)


def check_levels(levels, text: str | None = None) -> list[int]:
    """The one place levels are validated: a non-empty list of known levels, sorted, each once."""
    if not isinstance(levels, list) or not levels or any(lv not in task.LEVELS for lv in levels):
        raise argparse.ArgumentTypeError(f"levels must lie in {min(task.LEVELS)}-{max(task.LEVELS)}; "
                                         f"got {text if text is not None else levels!r}")
    return sorted(set(levels))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--out", type=Path, help="output directory (default runs/<timestamp>/)")
    p.add_argument("--resume", type=Path, metavar="DIR",
                   help=f"finish the sweep in DIR with its saved flags, keeping the passes and fails in its {RESULTS} "
                        "(other runs start over); only --max-cost may be given anew")
    p.add_argument("--offline", action="store_true",
                   help="no API key: scripted replies submit the reference and every known wrong conversion")
    p.add_argument("--allow-unisolated", action="store_true",
                   help="against the API, run model code as plain processes when bubblewrap cannot isolate it "
                        "(refused by default; --offline always may)")
    p.add_argument("--keep-workspaces", action="store_true",
                   help="keep each run's workspace (by default removed when the run ends; the submitted file and "
                        "the transcript stay)")
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


def plan(opts: argparse.Namespace) -> list[tuple[Run, str, list | None]]:
    """Every (run, name, script) of the sweep, levels interleaved so that an early stop covers each.
    Offline, a level's runs are its scripted conversions; online, --runs seeds of it."""
    if opts.offline:
        from scripted_api import offline_scripts
        per_level = {lv: offline_scripts(lv) for lv in opts.levels}
    else:
        per_level = {lv: [("model", None)] * opts.runs for lv in opts.levels}
    planned = []
    for i in range(max(len(v) for v in per_level.values())):
        for lv in opts.levels:
            if i < len(per_level[lv]):
                name, script = per_level[lv][i]
                planned.append((Run(len(planned), opts.seed + i, lv), name, script))
    return planned


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


def sandbox_report(isolate: bool) -> str:
    """What bounds the workers on this host, for the run report."""
    parts = [f"bubblewrap (workspace at {SANDBOX_WORKSPACE})" if isolate else
             "WARNING: not isolated (bwrap missing or unusable): plain processes"]
    if isolate:
        parts.append("no new user namespaces (seccomp)" if userns_filter() else
                     "WARNING: user namespaces not blocked (no seccomp filter for this architecture)")
    if cgroups_usable():
        parts.append(f"cgroup per worker: {MEMORY_BYTES >> 30} GiB memory, {MAX_PROCESSES} processes")
    else:  # RLIMIT_NPROC counts a whole uid's processes, so it binds only under a uid of the worker's own
        processes = f"{MAX_PROCESSES} processes (RLIMIT_NPROC, a uid per worker)" if isolate and os.geteuid() == 0 \
            else "processes NOT bounded"
        parts.append(f"WARNING: no cgroup could be created: memory bounded per process only (RLIMIT_AS), {processes}; "
                     f"to bound the whole sweep, start it as {SYSTEMD_SCOPE} python main.py ...")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if not opts.offline and not os.environ.get("ANTHROPIC_API_KEY"):
        print("error: ANTHROPIC_API_KEY is not set. Set it (export ANTHROPIC_API_KEY=...) "
              "or run `python main.py --offline` for the scripted run that needs no key.", file=sys.stderr)
        return 2
    if not opts.offline and opts.max_cost > 0 and report.price(opts.model) is None:
        print(f"error: no price is known for {opts.model}, so --max-cost cannot be enforced. Add its price to "
              "PRICES in report.py, or pass --max-cost 0 to run without a cap.", file=sys.stderr)
        return 2
    isolate = bwrap_usable()
    if not isolate and not opts.offline and not opts.allow_unisolated:
        print("error: bubblewrap (bwrap) is missing or cannot create namespaces here, so model code would run as a "
              "plain process of your user, able to read your files and this process's environment (the API key "
              "included). Install bubblewrap (apt-get install bubblewrap), or pass --allow-unisolated to accept "
              "that.", file=sys.stderr)
        return 2
    isolation = sandbox_report(isolate)
    if "WARNING" in isolation:
        print(isolation, file=sys.stderr)
    planned = plan(opts)
    records = recorded_runs(opts.out) if opts.resume else []
    latest = {(r.level, r.seed): r for r in records}  # a run started over is recorded again
    previous = [r for r in latest.values() if r.outcome in ("pass", "fail")]  # the rest start over
    kept = {(r.level, r.seed) for r in previous}
    kept_records = {id(r) for r in previous}  # every other record's spend still counts against the cap
    spent_before = 0.0 if opts.offline else sum(report.estimated_cost(opts.model, r.usage) or 0.0 for r in records
                                                if id(r) not in kept_records)
    todo = [(run, name, script) for run, name, script in planned if (run.level, run.seed) not in kept]
    if opts.offline:
        from scripted_api import ScriptedClient
        clients = [ScriptedClient(script) for _, _, script in todo]
        print("offline: scripted runs: " + ", ".join(f"{run.run_id:03d}=L{run.level} {name}" for run, name, _ in todo))
    else:
        clients = [anthropic.AsyncAnthropic(max_retries=0)] * len(todo)  # create_message retries
    try:
        if not opts.resume:  # a directory of its own: no two sweeps share one
            opts.out.mkdir(parents=True, exist_ok=opts.out.is_dir() and not any(opts.out.iterdir()))
        (opts.out / "config.json").write_text(json.dumps(sweep_config(opts), indent=2) + "\n")
    except FileExistsError:
        print(f"error: --out {opts.out} was created by another sweep just now; give another --out", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: --out {opts.out}: cannot write there ({e.strerror})", file=sys.stderr)
        return 2
    cap = "none (scripted)" if opts.offline else f"${opts.max_cost:.2f} (--max-cost; 0 for none)" \
        if opts.max_cost > 0 else "none (--max-cost 0)"
    print(f"{len(todo)} runs of level{'s' if len(opts.levels) > 1 else ''} {', '.join(map(str, opts.levels))} with "
          f"{'scripted replies' if opts.offline else opts.model}, {opts.concurrency} at a time"
          f"{f', {len(previous)} kept from before' if previous else ''}; spending cap {cap}; "
          f"transcripts and report.html in {opts.out}/")
    sweep = Sweep(opts, len(planned), isolation, previous, spent_before)
    try:
        asyncio.run(run_all([run for run, _, _ in todo], clients, opts, isolate, sweep))
    except KeyboardInterrupt:
        print("\ninterrupted: cancelling the runs still going", file=sys.stderr)
    summary = sweep.summary()
    (opts.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    report.write_report(opts.out, summary, sweep.done)
    print_summary(summary)
    if sweep.fatal is not None:
        print(f"error: the API refused the sweep, so it stopped: {sweep.fatal}", file=sys.stderr)
        return 1
    if len(sweep.done) + sweep.skipped < len(planned):
        return 130  # the shell's code for Ctrl-C
    if opts.offline:
        return offline_check(sweep.done, {run.run_id: name for run, name, _ in planned})
    errors = Counter(r.detail.splitlines()[-1] if r.detail else r.label for r in sweep.done if r.outcome == "error")
    if errors and summary["graded"] == 0:
        print(f"error: every run ended in an error; the most common cause ({errors.most_common(1)[0][1]} runs): "
              f"{errors.most_common(1)[0][0]}", file=sys.stderr)
        return 1
    return 0


def offline_check(done: list[Run], names: dict[int, str]) -> int:
    """The reference must pass and each wrong conversion must fail with its own label."""
    wrong = [f"run {r.run_id:03d} (L{r.level} {names[r.run_id]}) got {r.label}" for r in done
             if r.label != ("pass" if names[r.run_id] == "reference" else names[r.run_id])]
    if wrong:
        print("offline check FAILED: " + "; ".join(wrong))
        return 1
    references = sum(names[r.run_id] == "reference" for r in done)
    print(f"offline check OK: {references} reference run(s) passed and all {len(done) - references} wrong "
          "conversions failed with their own label")
    return 0


if __name__ == "__main__":
    sys.exit(main())
