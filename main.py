"""Measure a model's pass rate on the task: N runs at once, each graded, every transcript kept.

    python main.py --offline          # no key: scripted replies through the real loop
    python main.py --runs 10          # claude-haiku-4-5 through the Anthropic API
"""
import argparse
import asyncio
import json
import math
import os
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import anthropic

import task
from grader import grade
from limits import cgroups_usable, userns_filter
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
TARGET_BAND = (0.10, 0.40)
USAGE_KEYS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
# USD per million tokens (input, output); cache writes cost 1.25x input, cache reads 0.1x.
PRICES = {"claude-haiku-4-5": (1.0, 5.0), "claude-sonnet-4-5": (3.0, 15.0), "claude-opus-4-5": (5.0, 25.0)}


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
        response = await client.messages.create(
            model=opts.model, max_tokens=opts.max_tokens, tools=task.TOOLS, messages=with_cache_breakpoint(run.messages))
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
            if cut_off and use is uses[-1]:
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
            (run_dir / "transcript.md").write_text(render_transcript(run))
        except (OSError, TypeError, ValueError) as e:
            print(f"run {run.run_id:03d}: could not write its transcript: {e}", file=sys.stderr)
    return run


def render_transcript(run: Run) -> str:
    """The conversation as Markdown, for reading: text as is, tool calls and results as code blocks."""
    out = [f"# run {run.run_id:03d}: {run.outcome.upper()} {run.label}", "", run.detail, ""]
    for message in run.messages:
        content = message["content"]
        out.append(f"## {message['role']}\n")
        for block in [{"type": "text", "text": content}] if isinstance(content, str) else content:
            if block["type"] == "text":
                out.append(block["text"] + "\n")
            elif block["type"] == "tool_use":
                body = block["input"].get("code") if isinstance(block["input"], dict) else None
                body = body if isinstance(body, str) else json.dumps(block["input"])
                out.append(f"**{block['name']}**\n```\n{body}\n```\n")
            elif block["type"] == "tool_result":
                out.append(f"**result{' (error)' if block.get('is_error') else ''}**\n```\n{block['content']}\n```\n")
    return "\n".join(out)


def wilson_interval(passes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    p = passes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def estimated_cost(model: str, usage: dict[str, int]) -> float | None:
    if model not in PRICES:
        return None
    price_in, price_out = PRICES[model]
    return (usage["input_tokens"] * price_in + usage["cache_creation_input_tokens"] * price_in * 1.25
            + usage["cache_read_input_tokens"] * price_in * 0.1 + usage["output_tokens"] * price_out) / 1e6


def run_line(run: Run) -> str:
    tokens = f"{run.usage['input_tokens'] + run.usage['cache_read_input_tokens'] + run.usage['cache_creation_input_tokens']}" \
             f"/{run.usage['output_tokens']}"
    return (f"run {run.run_id:03d} seed {run.seed:<6} {run.outcome.upper():5} {run.label:<18} "
            f"steps {run.steps:<3} tokens in/out {tokens:<14} {run.seconds:6.1f}s")


def summarize(runs: list[Run], opts: argparse.Namespace, isolation: str, wall: float, planned: int) -> dict:
    graded = [r for r in runs if r.outcome != "error"]
    passes = sum(r.outcome == "pass" for r in graded)
    usage = sum((Counter(r.usage) for r in runs), Counter())
    low, high = wilson_interval(passes, len(graded))
    rate = passes / len(graded) if graded else None
    return {
        "model": opts.model, "level": opts.level, "seed": opts.seed, "offline": opts.offline,
        "runs_planned": planned, "runs_finished": len(runs), "graded": len(graded), "passes": passes,
        "pass_rate": rate, "wilson_95": [low, high],
        "in_target_band": rate is not None and TARGET_BAND[0] <= rate <= TARGET_BAND[1],
        "failures": dict(Counter(r.label for r in graded if r.outcome == "fail").most_common()),
        "errors": dict(Counter(r.label for r in runs if r.outcome == "error").most_common()),
        "tokens": {"input": usage["input_tokens"], "output": usage["output_tokens"],
                   "cache_write": usage["cache_creation_input_tokens"], "cache_read": usage["cache_read_input_tokens"]},
        "estimated_cost_usd": None if opts.offline else estimated_cost(opts.model, usage),
        "wall_seconds": round(wall, 1), "isolation": isolation,
    }


def print_summary(s: dict) -> None:
    print("\n== summary ==")
    if s["runs_finished"] < s["runs_planned"]:
        print(f"interrupted: {s['runs_finished']} of {s['runs_planned']} runs finished")
    if s["graded"]:
        low, high = s["wilson_95"]
        band = "" if s["offline"] else f"; {'inside' if s['in_target_band'] else 'outside'} the target band " \
            f"{TARGET_BAND[0]:.0%}-{TARGET_BAND[1]:.0%}"
        print(f"pass rate {s['passes']}/{s['graded']} = {s['pass_rate']:.0%} (95% Wilson {low:.0%}-{high:.0%}){band}")
    else:
        print("pass rate: no graded run")
    for label, n in s["failures"].items():
        print(f"  fail {label}: {n}")
    if s["errors"]:
        print(f"errors (not in the pass rate): {sum(s['errors'].values())} "
              + ", ".join(f"{k} {v}" for k, v in s["errors"].items()))
    t = s["tokens"]
    cost = f"~${s['estimated_cost_usd']:.2f}" if s["estimated_cost_usd"] is not None else \
        "none (scripted)" if s["offline"] else "unknown for this model"
    print(f"tokens: input {t['input']}, output {t['output']}, cache write {t['cache_write']}, "
          f"cache read {t['cache_read']}; estimated cost {cost}")
    print(f"wall time {s['wall_seconds']}s; sandbox: {s['isolation']}")


async def run_all(runs: list[Run], clients: list, opts: argparse.Namespace, isolate: bool, done: list[Run]) -> None:
    limit = asyncio.Semaphore(opts.concurrency)

    async def guarded(run: Run, client) -> None:
        async with limit:
            finished = await run_one(run, client, opts, isolate)
        done.append(finished)
        print(run_line(finished), flush=True)

    await asyncio.gather(*(guarded(run, client) for run, client in zip(runs, clients, strict=True)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=DEFAULT_RUNS, help=f"number of runs (default {DEFAULT_RUNS})")
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                   help=f"runs at once (default {DEFAULT_CONCURRENCY})")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"default {DEFAULT_MODEL}")
    p.add_argument("--level", type=int, default=task.DEFAULT_LEVEL, choices=sorted(task.LEVELS),
                   help=f"difficulty, 1 (easiest) to {max(task.LEVELS)} (default {task.DEFAULT_LEVEL})")
    p.add_argument("--seed", type=int, default=0, help="base instance seed; run i uses seed + i (default 0)")
    p.add_argument("--max-steps", type=int, default=task.DEFAULT_MAX_STEPS,
                   help=f"model replies per run (default {task.DEFAULT_MAX_STEPS})")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"max_tokens per reply (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--out", type=Path, help="output directory (default runs/<timestamp>/)")
    p.add_argument("--offline", action="store_true",
                   help="no API key: scripted replies submit the reference and every known wrong conversion")
    p.add_argument("--require-isolation", action="store_true", help="fail if bubblewrap cannot isolate the sandbox")
    p.add_argument("--verbose", action="store_true", help="print every tool call as it happens")
    opts = p.parse_args(argv)
    if min(opts.runs, opts.concurrency, opts.max_steps, opts.max_tokens) < 1:
        p.error("--runs, --concurrency, --max-steps and --max-tokens must be positive")
    opts.out = opts.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    return opts


def sandbox_report(isolate: bool) -> str:
    """What bounds the workers on this host, for the run report."""
    parts = [f"bubblewrap (workspace at {SANDBOX_WORKSPACE})" if isolate else
             "WARNING: not isolated (bwrap missing or unusable): plain processes"]
    if isolate:
        parts.append("no new user namespaces (seccomp)" if userns_filter() else
                     "WARNING: user namespaces not blocked (no seccomp filter for this architecture)")
    parts.append(f"cgroup per worker: {MEMORY_BYTES >> 30} GiB memory, {MAX_PROCESSES} processes" if cgroups_usable() else
                 "WARNING: no cgroup could be created: memory and process limits are per process (rlimits)")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if not opts.offline and not os.environ.get("ANTHROPIC_API_KEY"):
        print("error: ANTHROPIC_API_KEY is not set. Set it (export ANTHROPIC_API_KEY=...) "
              "or run `python main.py --offline` for the scripted run that needs no key.", file=sys.stderr)
        return 2
    isolate = bwrap_usable()
    if not isolate and opts.require_isolation:
        print("error: bubblewrap (bwrap) is missing or cannot create namespaces here, and --require-isolation "
              "was given. Install bubblewrap (apt-get install bubblewrap).", file=sys.stderr)
        return 2
    isolation = sandbox_report(isolate)
    if "WARNING" in isolation:
        print(isolation, file=sys.stderr)
    if opts.offline:
        from scripted_api import ScriptedClient, offline_scripts
        scripts = offline_scripts(opts.level)
        clients = [ScriptedClient(script) for _, script in scripts]
        print("offline: scripted runs: " + ", ".join(f"{i:03d}={name}" for i, (name, _) in enumerate(scripts)))
    else:
        client = anthropic.AsyncAnthropic(max_retries=API_RETRIES)
        clients = [client] * opts.runs
    runs = [Run(i, opts.seed + i, opts.level) for i in range(len(clients))]
    opts.out.mkdir(parents=True, exist_ok=True)
    print(f"{len(runs)} runs of level {opts.level} with {'scripted replies' if opts.offline else opts.model}, "
          f"{opts.concurrency} at a time; transcripts in {opts.out}/")
    done: list[Run] = []
    started = time.monotonic()
    try:
        asyncio.run(run_all(runs, clients, opts, isolate, done))
    except KeyboardInterrupt:
        print("\ninterrupted: cancelling the runs still going", file=sys.stderr)
    summary = summarize(done, opts, isolation, time.monotonic() - started, len(runs))
    (opts.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    if len(done) < len(runs):
        return 130  # the shell's code for Ctrl-C
    if opts.offline:
        return offline_check(done, [name for name, _ in scripts])
    return 0


def offline_check(done: list[Run], names: list[str]) -> int:
    """The reference must pass and each wrong conversion must fail with its own label."""
    wrong = [f"run {r.run_id:03d} ({names[r.run_id]}) got {r.label}" for r in done
             if r.label != ("pass" if names[r.run_id] == "reference" else names[r.run_id])]
    if wrong:
        print("offline check FAILED: " + "; ".join(wrong))
        return 1
    print(f"offline check OK: the reference passed and all {len(names) - 1} wrong conversions failed with their own label")
    return 0


if __name__ == "__main__":
    sys.exit(main())
