"""Measure a model's pass rate on the task: N runs at once, each graded, every transcript kept.

    python main.py --offline          # no key: scripted replies through the real loop
    python main.py --runs 10          # claude-haiku-4-5 through the Anthropic API
"""
import argparse
import asyncio
import json
import os
import shutil
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import anthropic

import report
import task
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
API_RETRIES = 8  # the SDK retries 429, 5xx, overloaded and timeouts with backoff
DEFAULT_MAX_COST = 5.0  # USD for the whole sweep, the runs a --resume keeps included
# The cost the cap expects of a run before any has finished: a long run, mostly cache reads.
PRIOR_RUN_USAGE = {"input_tokens": 60_000, "output_tokens": 40_000, "cache_creation_input_tokens": 100_000,
                   "cache_read_input_tokens": 1_500_000}
RESULTS = "results.jsonl"  # one line per finished run, appended as it ends
# Where the harness cannot make cgroups (a normal user on cgroup v2), this bounds the whole sweep instead.
SYSTEMD_SCOPE = "systemd-run --user --scope -p MemoryMax=16G -p TasksMax=1024"
SWEEP_FLAGS = ("model", "levels", "runs", "seed", "max_steps", "max_tokens", "thinking", "offline")  # what --resume restores


@dataclass
class Run:
    run_id: int
    seed: int
    level: int
    outcome: str = "error"  # pass | fail | error (infrastructure; not in the pass rate)
    label: str = "harness_error"  # the grader's label, or why the run ended without a grade
    detail: str = ""
    max_error: float | None = None
    steps: int = 0
    usage: dict[str, int] = field(default_factory=lambda: dict.fromkeys(USAGE_KEYS, 0))
    seconds: float = 0.0
    messages: list = field(default_factory=list)
    step_log: list = field(default_factory=list)


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


async def run_agent(run: Run, client, sandbox: Sandbox, opts: argparse.Namespace) -> Path | None:
    """The agent loop. Returns the submitted file (a copy outside the workspace) or None."""
    run.messages.append({"role": "user", "content": task.build_prompt(run.level, opts.max_steps)})
    for step in range(1, opts.max_steps + 1):
        started = time.monotonic()
        # Extended thinking, when asked for: its blocks go back unchanged in the conversation (as_param).
        thinking = {"thinking": {"type": "enabled", "budget_tokens": opts.thinking}} if opts.thinking else {}
        response = await client.messages.create(model=opts.model, max_tokens=opts.max_tokens, tools=task.TOOLS,
                                                messages=with_cache_breakpoint(run.messages), **thinking)
        run.steps = step
        usage = {k: getattr(response.usage, k) or 0 for k in USAGE_KEYS}
        run.usage = {k: run.usage[k] + usage[k] for k in USAGE_KEYS}
        run.step_log.append({"step": step, "stop_reason": response.stop_reason, "usage": usage,
                             "api_seconds": round(time.monotonic() - started, 3)})
        run.messages.append({"role": "assistant", "content": [as_param(b) for b in response.content]})
        uses = [b for b in response.content if b.type == "tool_use"]
        cut_off = response.stop_reason == "max_tokens"
        if not (cut_off or response.stop_reason == "tool_use" and uses):
            run.label = "no_submission" if response.stop_reason in ("end_turn", "stop_sequence") \
                else f"stop_{response.stop_reason}"
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
    """Stop the worker, then copy the submitted file out of the workspace for grading."""
    resolve_submission(sandbox.workspace, path)  # refuse before the worker, and its variables, are lost
    await sandbox.close()  # nothing may change the path while it is resolved and copied
    copy = sandbox.workspace.parent / "submission.npz"
    copy_submission(resolve_submission(sandbox.workspace, path), copy, task.MAX_SUBMISSION_BYTES)
    return copy


async def call_tool(name: str, tool_input, sandbox: Sandbox) -> tuple[str, bool]:
    if name == "python":
        if not isinstance(tool_input, dict) or not isinstance(tool_input.get("code"), str):
            return "python needs an input {\"code\": \"<python source>\"}.", True
        result = await sandbox.run(tool_input["code"])
        return result.output, result.is_error
    return f"Unknown tool {name!r}; the tools are: {', '.join(t['name'] for t in task.TOOLS)}.", True


async def run_one(run: Run, client, opts: argparse.Namespace, isolate: bool) -> Run:
    """One run from workspace to grade. Any failure is recorded on the run, never raised."""
    started = time.monotonic()
    run_dir = opts.out / f"run-{run.run_id:03d}"
    sandbox = None
    try:
        # A run resumed after an interruption starts clean: nothing of the earlier attempt is left.
        await asyncio.to_thread(shutil.rmtree, run_dir, ignore_errors=True)
        instance = await asyncio.to_thread(task.make_instance, run.level, run.seed)
        await asyncio.to_thread(task.write_workspace, run_dir / "workspace", instance)
        sandbox = Sandbox(run_dir / "workspace", isolate=isolate)
        submission = await run_agent(run, client, sandbox, opts)
        if submission is not None:
            g = await asyncio.to_thread(grade, submission, run.level, run.seed)
            run.outcome, run.label, run.detail, run.max_error = \
                ("pass" if g.passed else "fail"), g.label, g.detail, g.max_error
        else:
            run.outcome = "fail"
    except anthropic.BadRequestError as e:
        # A conversation grown past the context window is the model's doing; any other 400 is ours.
        too_long = "prompt is too long" in str(e)
        run.outcome, run.label = ("fail", "context_overflow") if too_long else ("error", "api_error")
        run.detail = f"{type(e).__name__}: {e}"
    except anthropic.APIError as e:
        run.outcome, run.label, run.detail = "error", "api_error", f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 -- a harness bug must not take the other runs down
        run.outcome, run.label = "error", "harness_error"
        run.detail = "".join(traceback.format_exception(e))
    finally:
        if sandbox is not None:
            await sandbox.close()
        run.seconds = time.monotonic() - started
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
    return (f"run {run.run_id:03d} L{run.level} seed {run.seed:<6} {run.outcome.upper():5} {run.label:<18} "
            f"steps {run.steps:<3} tokens in/out {tokens:<14} {run.seconds:6.1f}s")


class Sweep:
    """One invocation's runs as they end: the spending cap, results.jsonl, progress and report.html."""

    def __init__(self, opts: argparse.Namespace, planned: int, isolation: str, previous: list[Run] = ()):
        self.opts, self.planned, self.isolation = opts, planned, isolation
        self.done: list[Run] = list(previous)
        self.in_flight: dict[int, Run] = {}
        self.changed = asyncio.Condition()  # a run ended: the cap may now allow another
        self.skipped = 0
        self.started = time.monotonic()

    def cost(self, run: Run) -> float:
        return 0.0 if self.opts.offline else report.estimated_cost(self.opts.model, run.usage) or 0.0

    def expected_run_cost(self) -> float:
        """The mean cost of the runs finished so far, or, before any, a run of PRIOR_RUN_USAGE."""
        costs = [self.cost(r) for r in self.done if r.steps]
        return sum(costs) / len(costs) if costs else report.estimated_cost(self.opts.model, PRIOR_RUN_USAGE) or 0.0

    def spent(self) -> float:
        return sum(self.cost(r) for r in [*self.done, *self.in_flight.values()])

    def under_cap(self) -> bool:
        """Whether the spend so far, plus what the runs in flight and one more are expected to cost, stays under the cap."""
        if self.opts.offline or self.opts.max_cost <= 0:
            return True
        mean = self.expected_run_cost()
        expected = sum(max(0.0, mean - self.cost(r)) for r in self.in_flight.values()) + mean
        return self.spent() + expected <= self.opts.max_cost

    async def start(self, run: Run) -> bool:
        """Start `run` once the cap allows it, waiting for runs in flight to end (their costs then
        replace the estimate); False, and the run is skipped, if it would pass the cap with none in flight."""
        async with self.changed:
            while not self.under_cap():
                if not self.in_flight:
                    self.skipped += 1
                    return False
                await self.changed.wait()
            self.in_flight[run.run_id] = run
            return True

    async def finished(self, run: Run) -> None:
        async with self.changed:  # moved from in flight to done at once, so that the spend is never undercounted
            self.in_flight.pop(run.run_id, None)
            self.done.append(run)
            self.changed.notify_all()
        self.record(run)

    def record(self, run: Run) -> None:
        """Write down a finished run: results.jsonl, the progress line, report.html."""
        record = {k: v for k, v in asdict(run).items() if k != "messages"}
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
            "model": opts.model, "levels_swept": opts.levels, "seed": opts.seed, "offline": opts.offline,
            "thinking_budget": opts.thinking,
            "runs_planned": self.planned, "runs_finished": len(runs), "skipped": self.skipped,
            "skipped_reason": f"the spending cap of ${opts.max_cost:.2f} (--max-cost) would have been passed"
            if self.skipped else "",
            "graded": overall["graded"], "passes": overall["passes"], "pass_rate": rate, "wilson_95": overall["wilson_95"],
            "target_band": list(report.TARGET_BAND),
            "in_target_band": rate is not None and report.TARGET_BAND[0] <= rate <= report.TARGET_BAND[1],
            "levels": rows, "recommendation": "offline: the replies are scripted, so no level is recommended"
            if opts.offline else report.recommend(rows, opts.runs, sorted(task.LEVELS)),
            "failures": overall["failures"],
            "errors": dict(Counter(r.label for r in runs if r.outcome == "error").most_common()),
            "tokens": {"input": usage["input_tokens"], "output": usage["output_tokens"],
                       "cache_write": usage["cache_creation_input_tokens"], "cache_read": usage["cache_read_input_tokens"]},
            "estimated_cost_usd": cost,
            "cost_text": "none (scripted)" if opts.offline else "unknown for this model" if cost is None else f"${cost:.2f}",
            "wall_seconds": round(time.monotonic() - self.started, 1), "isolation": self.isolation,
        }


def print_summary(s: dict) -> None:
    print("\n== summary ==")
    if s["runs_finished"] < s["runs_planned"]:
        print(f"interrupted: {s['runs_finished']} of {s['runs_planned']} runs finished")
    if s["skipped"]:
        print(f"skipped: {s['skipped']} runs never started: {s['skipped_reason']}")
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
            finished = await run_one(run, client, opts, isolate)
        await sweep.finished(finished)

    await asyncio.gather(*(guarded(run, client) for run, client in zip(runs, clients, strict=True)))


def parse_levels(text: str) -> list[int]:
    """'4-6' or '4,6' -> [4, 5, 6] or [4, 6]."""
    try:
        if "-" in text:
            first, last = (int(x) for x in text.split("-", 1))
            levels = list(range(first, last + 1))
        else:
            levels = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"levels are A-B or A,B,...; got {text!r}")
    if not levels or any(lv not in task.LEVELS for lv in levels):
        raise argparse.ArgumentTypeError(f"levels must lie in {min(task.LEVELS)}-{max(task.LEVELS)}; got {text!r}")
    return levels


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
    p.add_argument("--seed", type=int, default=0, help="base instance seed; run i of a level uses seed + i (default 0)")
    p.add_argument("--max-steps", type=int, default=task.DEFAULT_MAX_STEPS,
                   help=f"model replies per run (default {task.DEFAULT_MAX_STEPS})")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"max_tokens per reply (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--thinking", type=int, default=0, metavar="TOKENS",
                   help="extended thinking with this budget per reply, at least 1024 and below --max-tokens "
                        "(default 0: off)")
    p.add_argument("--max-cost", type=float, default=DEFAULT_MAX_COST,
                   help=f"USD: no run starts once the spend plus the expected cost of the runs in flight would pass "
                        f"it; 0 for no cap (default {DEFAULT_MAX_COST:g})")
    p.add_argument("--out", type=Path, help="output directory (default runs/<timestamp>/)")
    p.add_argument("--resume", type=Path, metavar="DIR",
                   help=f"finish the sweep in DIR with its own flags, keeping the runs in its {RESULTS}")
    p.add_argument("--offline", action="store_true",
                   help="no API key: scripted replies submit the reference and every known wrong conversion")
    p.add_argument("--require-isolation", action="store_true", help="fail if bubblewrap cannot isolate the sandbox")
    p.add_argument("--verbose", action="store_true", help="print every tool call as it happens")
    opts = p.parse_args(argv)
    if opts.resume:
        try:
            saved = json.loads((opts.resume / "config.json").read_text())
        except (OSError, ValueError) as e:
            p.error(f"--resume {opts.resume}: cannot read its config.json ({e})")
        vars(opts).update({k: saved[k] for k in SWEEP_FLAGS}, out=opts.resume)
    else:
        opts.levels = opts.levels or [opts.level or task.DEFAULT_LEVEL]
    if min(opts.runs, opts.concurrency, opts.max_steps, opts.max_tokens) < 1:
        p.error("--runs, --concurrency, --max-steps and --max-tokens must be positive")
    if opts.thinking and not 1024 <= opts.thinking < opts.max_tokens:  # what the Messages API accepts
        p.error(f"--thinking must be at least 1024 and below --max-tokens ({opts.max_tokens}), or 0 for off")
    opts.out = opts.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    return opts


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


def finished_runs(out: Path) -> list[Run]:
    """The runs recorded in out/results.jsonl (none if it does not exist)."""
    path = out / RESULTS
    lines = path.read_text().splitlines() if path.exists() else []
    return [Run(**{k: v for k, v in json.loads(line).items() if k in Run.__dataclass_fields__}) for line in lines if line]


def sandbox_report(isolate: bool) -> str:
    """What bounds the workers on this host, for the run report."""
    parts = [f"bubblewrap (workspace at {SANDBOX_WORKSPACE})" if isolate else
             "WARNING: not isolated (bwrap missing or unusable): plain processes"]
    if isolate:
        parts.append("no new user namespaces (seccomp)" if userns_filter() else
                     "WARNING: user namespaces not blocked (no seccomp filter for this architecture)")
    parts.append(f"cgroup per worker: {MEMORY_BYTES >> 30} GiB memory, {MAX_PROCESSES} processes" if cgroups_usable() else
                 "WARNING: no cgroup could be created: memory and process limits are per process (rlimits); to "
                 f"bound the whole sweep, start it as {SYSTEMD_SCOPE} python main.py ...")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if not opts.offline and not os.environ.get("ANTHROPIC_API_KEY"):
        print("error: ANTHROPIC_API_KEY is not set. Set it (export ANTHROPIC_API_KEY=...) "
              "or run `python main.py --offline` for the scripted run that needs no key.", file=sys.stderr)
        return 2
    if not opts.offline and opts.max_cost > 0 and opts.model not in report.PRICES:
        print(f"error: no price is known for {opts.model}, so --max-cost cannot be enforced. Add its price to "
              "PRICES in report.py, or pass --max-cost 0 to run without a cap.", file=sys.stderr)
        return 2
    isolate = bwrap_usable()
    if not isolate and opts.require_isolation:
        print("error: bubblewrap (bwrap) is missing or cannot create namespaces here, and --require-isolation "
              "was given. Install bubblewrap (apt-get install bubblewrap).", file=sys.stderr)
        return 2
    isolation = sandbox_report(isolate)
    if "WARNING" in isolation:
        print(isolation, file=sys.stderr)
    planned = plan(opts)
    previous = finished_runs(opts.out) if opts.resume else []
    kept = {(r.level, r.seed) for r in previous}
    todo = [(run, name, script) for run, name, script in planned if (run.level, run.seed) not in kept]
    if opts.offline:
        from scripted_api import ScriptedClient
        clients = [ScriptedClient(script) for _, _, script in todo]
        print("offline: scripted runs: " + ", ".join(f"{run.run_id:03d}=L{run.level} {name}" for run, name, _ in todo))
    else:
        clients = [anthropic.AsyncAnthropic(max_retries=API_RETRIES)] * len(todo)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "config.json").write_text(json.dumps({k: getattr(opts, k) for k in SWEEP_FLAGS}, indent=2) + "\n")
    cap = "none (scripted)" if opts.offline else f"${opts.max_cost:.2f} (--max-cost; 0 for none)" \
        if opts.max_cost > 0 else "none (--max-cost 0)"
    print(f"{len(todo)} runs of level{'s' if len(opts.levels) > 1 else ''} {', '.join(map(str, opts.levels))} with "
          f"{'scripted replies' if opts.offline else opts.model}, {opts.concurrency} at a time"
          f"{f', {len(previous)} kept from before' if previous else ''}; spending cap {cap}; "
          f"transcripts and report.html in {opts.out}/")
    sweep = Sweep(opts, len(planned), isolation, previous)
    try:
        asyncio.run(run_all([run for run, _, _ in todo], clients, opts, isolate, sweep))
    except KeyboardInterrupt:
        print("\ninterrupted: cancelling the runs still going", file=sys.stderr)
    summary = sweep.summary()
    (opts.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    report.write_report(opts.out, summary, sweep.done)
    print_summary(summary)
    if len(sweep.done) + sweep.skipped < len(planned):
        return 130  # the shell's code for Ctrl-C
    if opts.offline:
        return offline_check(sweep.done, {run.run_id: name for run, name, _ in planned})
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
