"""The harness: the agent loop, one run, N runs at once, run_sweep (the one way a sweep runs) and main()
(`python main.py --help`). The flags are in flags.py, the spending cap in budget.py, the records and
resuming in records.py, what runs next (a fixed sweep or the band search) in policy.py, a sweep's
progress and summary in sweep.py; the numbers and the console in report.py, the pages in report_html.py;
the sandbox in tools.py.
"""
import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import anthropic

import band_search
import records
import report
import report_html
import task
from budget import Budget
from flags import SWEEP_FLAGS, parse_args
from grader import grade
from policy import BandSearch, FixedSweep, policy_for
from records import Run, now
from report import USAGE_KEYS
from sweep import Sweep
from tools import (
    Sandbox,
    SubmitError,
    bwrap_usable,
    sandbox_report,
    take_submission,
)

# Transient API errors (429, 5xx, overloaded, connection failures) are retried by this loop, not the
# SDK's: each wait honours retry-after, else doubles from 1 s up to MAX_BACKOFF_S, is lengthened by up to
# JITTER of itself (so that runs that met the same error do not retry in lockstep), and a step gives up (the
# run becomes an api_error) once its waits would pass RETRY_BUDGET_S. Until any request of the sweep has had an
# answer, a connection failure gets CONNECT_BUDGET_S instead: a wrong address, a proxy or no network then ends
# the sweep in about a minute (6 tries, each of at most the SDK's 5 s connect timeout), not in 10 minutes per step.
RETRY_BUDGET_S = 600.0
CONNECT_BUDGET_S = 45.0
MAX_BACKOFF_S = 60.0
JITTER = 0.25
TRANSIENT = (anthropic.RateLimitError, anthropic.InternalServerError, anthropic.APIConnectionError,
             anthropic.ConflictError, anthropic.RequestTimeoutError)
# An error event in the middle of a stream comes as a plain APIStatusError (HTTP 200): its type says what it is.
TRANSIENT_TYPES = {"overloaded_error", "api_error", "rate_limit_error", "timeout_error"}


def transient(e: Exception) -> bool:
    error = getattr(e, "body", None)
    error = error.get("error") if isinstance(error, dict) else None
    return isinstance(e, TRANSIENT) or isinstance(error, dict) and error.get("type") in TRANSIENT_TYPES


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


class Unreachable(Exception):
    """No request of the sweep has had an answer, and connecting has failed for CONNECT_BUDGET_S: fatal."""


@dataclass
class ApiContact:
    """Shared by a sweep's runs: whether any of its requests has had an answer from the API."""
    answered: bool = False


def conversation_too_long(e: anthropic.APIStatusError) -> bool:
    """A 400 or 413 that the conversation's size caused: the model's doing, not the harness's."""
    return e.status_code == 413 or e.status_code == 400 and "prompt is too long" in str(e)


async def wait_before_retry(seconds: float) -> None:
    await asyncio.sleep(seconds)


def retry_wait(e: anthropic.APIError, backoff: float) -> float:
    """The API's retry-after if it gave one, else the backoff; lengthened by a random share of up to JITTER."""
    response = getattr(e, "response", None)
    after = response.headers.get("retry-after") if response is not None else None
    try:
        wait = min(MAX_BACKOFF_S, max(0.0, float(after)))
    except (TypeError, ValueError):
        wait = backoff
    return wait * (1 + random.uniform(0, JITTER))


async def create_message(client, request: dict, where: str, contact: ApiContact,
                         stop: Callable[[], tuple[str, str] | None]):
    """One reply, streamed (so any max_tokens the API accepts works), transient errors retried, each wait told on
    stderr (`where` names the run and step). Raises Unreachable once connecting has failed for CONNECT_BUDGET_S
    while no request of the sweep has had an answer, and SweepStopped if `stop` says so after a wait."""
    waited, backoff = 0.0, 1.0
    while True:
        try:
            async with client.messages.stream(**request) as stream:
                contact.answered = True  # the response has begun: the API is there
                return await stream.get_final_message()
        except anthropic.APIError as e:
            contact.answered |= isinstance(e, anthropic.APIStatusError)
            if not transient(e):
                raise
            wait, budget = retry_wait(e, backoff), RETRY_BUDGET_S if contact.answered else CONNECT_BUDGET_S
            if waited + wait > budget and not contact.answered:
                raise Unreachable(f"no answer from the API at {client.base_url} after {waited:.0f} s of retries "
                                  f"({type(e).__name__}: {e}); check the network, any proxy (HTTPS_PROXY) and "
                                  "ANTHROPIC_BASE_URL") from e
            if waited + wait > budget:
                raise
            print(f"{where}: {type(e).__name__}: {e}; retrying in {wait:.1f} s, {waited + wait:.1f} s waited in all "
                  f"(gives up past {budget:.0f} s)", file=sys.stderr, flush=True)
            await wait_before_retry(wait)
            waited, backoff = waited + wait, min(MAX_BACKOFF_S, backoff * 2)
            if why := stop():
                raise SweepStopped(*why)


async def run_agent(run: Run, client, sandbox: Sandbox, opts: argparse.Namespace,
                    stop: Callable[[], tuple[str, str] | None], contact: ApiContact) -> Path | None:
    """The agent loop. Returns the submitted file (a copy outside the workspace) or None.
    Before each request it asks `stop` (the spending cap, a fatal API error) and stops the run if told."""
    run.messages.append({"role": "user", "content": task.build_prompt(run.level, opts.max_steps)})
    for step in range(1, opts.max_steps + 1):
        if why := stop():
            raise SweepStopped(*why)
        started = time.monotonic()
        # Extended thinking, when asked for: its blocks go back unchanged in the conversation (as_param).
        thinking = {"thinking": {"type": "enabled", "budget_tokens": opts.thinking}} if opts.thinking else {}
        request = {"model": opts.model, "max_tokens": opts.max_tokens, "tools": task.TOOLS,
                   "messages": with_cache_breakpoint(run.messages), **thinking}
        response = await create_message(client, request, f"run {run.run_id:03d} step {step}", contact, stop)
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
        last_cut = cut_off and bool(uses) and uses[-1] is response.content[-1]  # cut while being written
        results, submission = await answer_tools(run, uses, last_cut, sandbox, opts)
        if submission is not None or run.label == "disk_quota":
            return submission
        run.step_log[-1]["tool_seconds"] = round(time.monotonic() - started, 3)
        if cut_off:
            results.append({"type": "text", "text": f"Your reply was cut off at the max_tokens limit "
                                                    f"({opts.max_tokens}). Continue, in shorter pieces."})
        run.messages.append({"role": "user", "content": results})
    run.label = "max_steps"
    return None


async def answer_tools(run: Run, uses: list, last_cut: bool, sandbox: Sandbox,
                       opts: argparse.Namespace) -> tuple[list[dict], Path | None]:
    """Each tool call's result, in order, or the submitted file once one is taken (the run then ends,
    as it does, with label disk_quota, once the workspace stays over its quota). `last_cut`: the last
    call was being written when max_tokens cut the reply off, and is not run."""
    results = []
    for use in uses:
        if last_cut and use is uses[-1]:
            results.append(tool_result(use.id, "This tool call was cut off by the max_tokens limit and was not run.",
                                       is_error=True))
        elif use.name == "submit":
            try:
                submission = await take_submission(sandbox, use.input.get("path") if isinstance(use.input, dict) else None)
            except SubmitError as e:
                results.append(tool_result(use.id, f"Not submitted: {e}.", is_error=True))
            else:
                if await sandbox.over_quota():  # the worker is stopped: this is final
                    run.label = "disk_quota"
                    return results, None
                return results, submission
        else:
            results.append(tool_result(use.id, *await call_tool(use.name, use.input, sandbox)))
            if sandbox.calls_over_quota >= 2:
                run.label = "disk_quota"
                return results, None
        if opts.verbose:
            print(f"  run {run.run_id:03d} step {run.steps} {use.name}: {results[-1]['content'][:200]!r}")
    return results, None


async def call_tool(name: str, tool_input, sandbox: Sandbox) -> tuple[str, bool]:
    if name == "python":
        if not isinstance(tool_input, dict) or not isinstance(tool_input.get("code"), str):
            return "python needs an input {\"code\": \"<python source>\"}.", True
        result = await sandbox.run(tool_input["code"])
        return result.output, result.is_error
    return f"Unknown tool {name!r}; the tools are: {', '.join(t['name'] for t in task.TOOLS)}.", True


async def run_one(run: Run, client, opts: argparse.Namespace, isolate: bool,
                  stop: Callable[[], tuple[str, str] | None] = lambda: None, contact: ApiContact | None = None) -> Run:
    """One run from workspace to grade. Any failure is recorded on the run, never raised. `contact` is shared by
    the sweep's runs (a run of its own gets its own)."""
    started, run.started_at = time.monotonic(), now()
    run_dir = opts.out / f"run-{run.run_id:03d}"
    sandbox = None
    try:
        # A run resumed after an interruption starts clean: nothing of the earlier attempt is left.
        await asyncio.to_thread(shutil.rmtree, run_dir, ignore_errors=True)
        instance = await asyncio.to_thread(task.make_instance, run.level, run.seed)
        await asyncio.to_thread(task.write_workspace, run_dir / "workspace", instance)
        sandbox = Sandbox(run_dir / "workspace", isolate=isolate)
        submission = await run_agent(run, client, sandbox, opts, stop, contact or ApiContact())
        if submission is not None:
            g = await asyncio.to_thread(grade, submission, run.level, run.seed)
            outcome = "error" if g.label == "ungradable" else "pass" if g.passed else "fail"
            run.outcome, run.label, run.detail, run.max_error = outcome, g.label, g.detail, g.max_error
        else:
            run.outcome = "fail"
    except SweepStopped as e:
        run.outcome, (run.label, why) = "stopped", e.args
        run.detail = f"stopped before step {run.steps + 1}: {why}"
    except Unreachable as e:  # as fatal as a refusal: no run of the sweep could get further
        run.outcome, run.label, run.detail = "error", "api_fatal", str(e)
    except anthropic.APIStatusError as e:
        # A conversation grown too large is the model's doing; a transient error that outlasted the retries
        # costs this run; any other refusal (key, model, permissions, a request the API rejects) is fatal.
        run.outcome, run.label = ("fail", "context_overflow") if conversation_too_long(e) else \
            ("error", "api_error") if transient(e) else ("error", "api_fatal")
        run.detail = ("the API refused the sweep: " if run.label == "api_fatal" else "") + \
            f"{type(e).__name__} ({e.status_code}): {e.message}"
    except anthropic.APIError as e:  # connection failures that outlasted the retries
        run.outcome, run.label, run.detail = "error", "api_error", f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 -- a harness bug must not take the other runs down
        run.outcome, run.label = "error", "harness_error"
        run.detail = "".join(traceback.format_exception(e))
    finally:
        if sandbox is not None:
            await sandbox.close()
        if not opts.keep_workspaces:  # the transcript stays, and so does a model's submitted file (a copy beside it)
            await asyncio.to_thread(shutil.rmtree, run_dir / "workspace", ignore_errors=True)
            if opts.offline:  # a scripted submission is the project's own, rebuilt from (level, seed) at will
                (run_dir / "submission.npz").unlink(missing_ok=True)
        run.seconds, run.ended_at = time.monotonic() - started, now()
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "transcript.json").write_text(json.dumps(asdict(run), indent=1, default=str))
            (run_dir / "transcript.html").write_text(report_html.transcript_html(run))
        except (OSError, TypeError, ValueError) as e:
            print(f"run {run.run_id:03d}: could not write its transcript: {e}", file=sys.stderr)
    return run


async def run_all(runs: list[Run], client_for: Callable[[Run], anthropic.AsyncAnthropic], opts: argparse.Namespace,
                  isolate: bool, sweep: Sweep, contact: ApiContact) -> None:
    """The runs, --concurrency at a time, each started once the budget admits it."""
    limit = asyncio.Semaphore(opts.concurrency)

    async def guarded(run: Run) -> None:
        async with limit:
            if not await sweep.budget.admit(run):
                return
            finished = await run_one(run, client_for(run), opts, isolate, sweep.budget.why_stop, contact)
        await sweep.budget.settle(finished)
        sweep.run_ended(finished)

    await asyncio.gather(*(guarded(run) for run in runs))


async def run_batches(policy: FixedSweep | BandSearch, first: list[Run], client_for: Callable, opts: argparse.Namespace,
                      isolate: bool, sweep: Sweep) -> None:
    """The policy's batches, one after another, until it has none or the budget closes."""
    contact, batch = ApiContact(), first
    while batch and sweep.budget.may_send():
        sweep.planned += len(batch)
        if opts.offline:
            print("offline: scripted runs: " + ", ".join(f"{r.run_id:03d}=L{r.level} {policy.script(r)[0]}"
                                                          for r in batch))
        await run_all(batch, client_for, opts, isolate, sweep, contact)
        batch = policy.next_runs(sweep.runs)


def run_sweep(opts: argparse.Namespace, isolate: bool, isolation: str,
              client_for: Callable[[Run], anthropic.AsyncAnthropic] | None = None) -> Sweep:
    """A sweep from its flags to summary.json: the policy (a fixed sweep or the band search), the runs a --resume
    keeps, config.json, the runs in batches under the budget, then the summary, report.html and the console's.
    `client_for(run)` gives each run its API client: by default one AsyncAnthropic client, or offline the
    policy's scripted replies. Raises OSError if --out cannot be made or written."""
    policy = policy_for(opts)
    recorded = records.recorded_runs(opts.out) if opts.resume else []
    previous = policy.keep(recorded)
    kept = {id(r) for r in previous}
    budget = Budget(opts, previous, [r for r in recorded if id(r) not in kept])
    if client_for is None and opts.offline:
        from scripted_api import ScriptedClient
        client_for = lambda run: ScriptedClient(policy.script(run)[1])
    elif client_for is None:
        client = anthropic.AsyncAnthropic(max_retries=0)  # create_message retries
        client_for = lambda run: client
    if not opts.resume:  # a directory of its own: no two sweeps share one
        opts.out.mkdir(parents=True, exist_ok=opts.out.is_dir() and not any(opts.out.iterdir()))
    records.write_config(opts, SWEEP_FLAGS)
    sweep = Sweep(opts, budget, policy, isolation)
    first = policy.next_runs(sweep.runs)
    print(opening_line(opts, first, previous))
    try:
        asyncio.run(run_batches(policy, first, client_for, opts, isolate, sweep))
    except KeyboardInterrupt:
        print("\ninterrupted: cancelling the runs still going", file=sys.stderr)
        sweep.interrupted, sweep.unfinished = True, "interrupted (Ctrl-C)"
    if isinstance(policy, BandSearch):
        if not sweep.unfinished and policy.verdict is None:
            sweep.unfinished = "a fatal API error stopped the search" if budget.fatal else \
                "the spending cap stopped the search"
        sweep.verdict = policy.verdict or band_search.stopped_reading(sweep.runs, opts.confirm, sweep.unfinished)
    summary = sweep.summary()
    (opts.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    report_html.write_report(opts.out, summary, sweep.runs)
    report.print_summary(summary)
    return sweep


def opening_line(opts: argparse.Namespace, first: list[Run], previous: list[Run]) -> str:
    cap = "none (scripted)" if opts.offline else f"${opts.max_cost:.2f} (--max-cost; 0 for none)" \
        if opts.max_cost > 0 else "none (--max-cost 0)"
    if opts.find_band:
        what = (f"a band search{' to a confirmed interval' if opts.confirm else ''}, first {len(first)} runs at level "
                f"{first[0].level}" if first else "a band search that has already ended")
    else:
        what = f"{len(first)} runs of level{'s' if len(opts.levels) > 1 else ''} {', '.join(map(str, opts.levels))}"
    return (f"{what} with {'scripted replies' if opts.offline else opts.model}, {opts.concurrency} at a time"
            f"{f', {len(previous)} kept from before' if previous else ''}; spending cap {cap}; "
            f"transcripts and report.html in {opts.out}/")


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
    try:
        sweep = run_sweep(opts, isolate, isolation)
    except FileExistsError:
        print(f"error: --out {opts.out} was created by another sweep just now; give another --out", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: --out {opts.out}: cannot write there ({e.strerror})", file=sys.stderr)
        return 2
    if sweep.budget.fatal is not None:
        print(f"error: the sweep stopped: {sweep.budget.fatal}", file=sys.stderr)
        return 1
    if sweep.interrupted:
        return 130  # the shell's code for Ctrl-C
    if opts.offline:
        return offline_check(sweep.runs, lambda run: sweep.policy.script(run)[0])
    errors = Counter(r.detail.splitlines()[-1] if r.detail else r.label for r in sweep.runs if r.outcome == "error")
    if errors and sweep.summary()["graded"] == 0:
        print(f"error: every run ended in an error; the most common cause ({errors.most_common(1)[0][1]} runs): "
              f"{errors.most_common(1)[0][0]}", file=sys.stderr)
        return 1
    return 0


def offline_check(done: list[Run], name_of: Callable[[Run], str]) -> int:
    """The reference must pass and each wrong conversion must fail with its own label."""
    names = {r.run_id: name_of(r) for r in done}
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
    # Ctrl-C must stop a sweep even when SIGINT was ignored at start (a job started with `&` from a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
