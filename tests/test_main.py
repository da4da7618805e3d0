"""The real agent loop, sandbox and grader, driven by the scripted stand-in for the API."""
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anthropic
import pytest
from conftest import bz2_bomb

import flags
import main
import report
import tools
from budget import Budget
from policy import FixedSweep
from records import SCHEMA_VERSION, task_version
from scripted_api import (
    ScriptedClient,
    connection_error,
    conversion_script,
    http_error,
    offline_scripts,
    reply,
    text,
    thinking,
    tool_use,
)
from sweep import Sweep
from tools import bwrap_usable

ROOT = Path(__file__).resolve().parents[1]
ISOLATE = bwrap_usable()


def run_script(tmp_path, replies, *flags, latency=0.0) -> tuple[main.Run, ScriptedClient]:
    opts = main.parse_args(["--level", "1", "--out", str(tmp_path), *flags])
    client = ScriptedClient(replies, latency=latency)
    run = asyncio.run(main.run_one(main.Run(0, 0, 1), client, opts, ISOLATE))
    return run, client


def results_of(request: dict) -> list[dict]:
    return request["messages"][-1]["content"]


def test_reference_conversion_passes_and_transcript_is_written(tmp_path):
    run, _ = run_script(tmp_path, conversion_script(None))
    assert (run.outcome, run.label, run.steps) == ("pass", "pass", 2)
    assert (tmp_path / "run-000" / "submission.npz").is_file()  # a model's file is kept as it was graded
    transcript = json.loads((tmp_path / "run-000" / "transcript.json").read_text())
    assert transcript["outcome"] == "pass" and len(transcript["messages"]) == 4
    assert transcript["messages"][2]["content"][0]["content"] == "wrote converted.npz\n"
    assert transcript["usage"]["input_tokens"] > 0 and len(transcript["step_log"]) == 2
    readable = (tmp_path / "run-000" / "transcript.html").read_text()
    assert "<h1>run 000</h1>" in readable and "PASS</span> <b>pass</b>" in readable and "def convert(" in readable
    assert "result</span><pre>wrote converted.npz\n</pre>" in readable and "submit call" in readable


def test_wrong_conversion_fails_with_its_label(tmp_path):
    run, _ = run_script(tmp_path, conversion_script("gate_up_order"))
    assert (run.outcome, run.label) == ("fail", "gate_up_order")


def test_every_request_caches_its_newest_block(tmp_path):
    _, client = run_script(tmp_path, conversion_script(None))
    for request in client.requests:
        assert json.dumps(request).count("cache_control") == 1
        assert "cache_control" in request["messages"][-1]["content"][-1]


def test_end_turn_without_submission(tmp_path):
    run, _ = run_script(tmp_path, [reply(text("I give up."), stop_reason="end_turn")])
    assert (run.outcome, run.label, run.steps) == ("fail", "no_submission", 1)


@pytest.mark.parametrize("reason, label", [("refusal", "refusal"),
                                           ("model_context_window_exceeded", "context_overflow")])
def test_other_stop_reasons_end_with_their_own_label(tmp_path, reason, label):
    run, _ = run_script(tmp_path, [reply(text("..."), stop_reason=reason)])
    assert (run.outcome, run.label) == ("fail", label)


def test_max_tokens_mid_tool_call_gets_an_error_result_and_the_run_goes_on(tmp_path):
    cut = reply(text("Let me write it all"), tool_use("python", {"code": "print('almost"}), stop_reason="max_tokens")
    run, client = run_script(tmp_path, [cut, *conversion_script(None)])
    assert run.outcome == "pass" and run.steps == 3
    answer = results_of(client.requests[1])
    assert answer[0]["is_error"] and "cut off by the max_tokens limit" in answer[0]["content"]
    assert answer[-1]["type"] == "text" and "max_tokens" in answer[-1]["text"]


def test_max_tokens_after_a_complete_tool_call_runs_it(tmp_path):
    done = reply(tool_use("python", {"code": "print(6 * 7)"}), text("Next I will"), stop_reason="max_tokens")
    _, client = run_script(tmp_path, [done])
    answer = results_of(client.requests[1])
    assert (answer[0]["content"], answer[0]["is_error"]) == ("42\n", False)  # only the cut text is lost
    assert answer[-1]["type"] == "text" and "max_tokens" in answer[-1]["text"]


def test_thinking_blocks_go_back_unchanged_and_the_budget_is_recorded(tmp_path):
    replies = [reply(thinking("First read the arguments."), tool_use("python", {"code": "print(1)"})),
               reply(thinking("Done."), text("Stopping."), stop_reason="end_turn")]
    run, client = run_script(tmp_path, replies, "--thinking", "2048")
    assert run.label == "no_submission" and len(client.requests) == 2  # the stand-in refuses an altered block
    assert all(r["thinking"] == {"type": "enabled", "budget_tokens": 2048} for r in client.requests)
    sent = client.requests[1]["messages"][1]["content"][0]
    assert sent["type"] == "thinking" and sent["thinking"] == "First read the arguments." and "signature" in sent
    assert "<summary>thinking</summary>" in (tmp_path / "run-000" / "transcript.html").read_text()
    assert main.main(["--offline", "--level", "1", "--thinking", "2048", "--out", str(tmp_path / "sweep")]) == 0
    assert json.loads((tmp_path / "sweep" / "config.json").read_text())["thinking"] == 2048
    page = (tmp_path / "sweep" / "report.html").read_text()
    assert "--thinking 2048" in page and "<title>Scripted offline sweep (no model), level 1</title>" in page


def test_an_altered_thinking_block_is_refused_like_the_api_does():
    client = ScriptedClient([reply(thinking("plan"), tool_use("python", {"code": "1"}))])
    first = asyncio.run(client.messages.create(model="m", max_tokens=4096, messages=[{"role": "user", "content": "go"}],
                                               thinking={"type": "enabled", "budget_tokens": 1024}))
    block = first.content[0].model_dump()
    for changed in ({**block, "thinking": "another plan"}, {**block, "signature": "forged"}):
        messages = [{"role": "user", "content": "go"}, {"role": "assistant", "content": [changed, first.content[1].model_dump()]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": first.content[1].id, "content": "1"}]}]
        with pytest.raises(anthropic.BadRequestError, match="thinking block"):
            asyncio.run(client.messages.create(model="m", max_tokens=4096, messages=messages,
                                               thinking={"type": "enabled", "budget_tokens": 1024}))


@pytest.mark.parametrize("flags", [["--thinking", "512"], ["--thinking", "16000"], ["--thinking", "2000", "--max-tokens", "1500"]])
def test_a_thinking_budget_the_api_would_refuse_is_a_clear_error(flags, capsys):
    with pytest.raises(SystemExit) as e:
        main.parse_args(flags)
    assert e.value.code == 2 and "--thinking must be at least 1024" in capsys.readouterr().err


def test_max_tokens_in_text_asks_to_continue(tmp_path):
    run, client = run_script(tmp_path, [reply(text("A long thought"), stop_reason="max_tokens")])
    assert run.label == "no_submission"  # the script then ends its turn
    assert "cut off" in results_of(client.requests[1])[0]["text"]


def test_several_tool_calls_per_reply_run_in_order(tmp_path):
    both = reply(tool_use("python", {"code": "x = 2"}), tool_use("python", {"code": "print(x * 21)"}))
    _, client = run_script(tmp_path, [both])
    first, second = results_of(client.requests[1])
    assert (first["content"], second["content"]) == ("(no output)", "42\n")


def test_unknown_tool_and_malformed_input_get_error_results(tmp_path):
    bad = reply(tool_use("bash", {"cmd": "ls"}), tool_use("python", {"source": "1"}), tool_use("submit", {}),
                tool_use("submit", {"path": "../../etc/passwd"}))
    run, client = run_script(tmp_path, [bad, *conversion_script(None)])
    assert run.outcome == "pass"
    results = results_of(client.requests[1])
    assert all(r["is_error"] for r in results)
    assert "Unknown tool 'bash'" in results[0]["content"]
    assert "python needs an input" in results[1]["content"]
    assert "non-empty string" in results[2]["content"]
    assert "outside the working directory" in results[3]["content"]


@pytest.fixture
def slept(monkeypatch) -> dict[int, list[float]]:
    """Every retry's wait, by the asyncio task (the run) that waited, instead of waiting."""
    waits = {}

    async def no_sleep(seconds):
        waits.setdefault(id(asyncio.current_task()), []).append(seconds)
    monkeypatch.setattr(main, "wait_before_retry", no_sleep)
    return waits


def test_transient_errors_cost_a_retry_not_the_run(tmp_path, slept, capsys):
    """429, 529 and 500 with retry-after are retried by the loop (through the real SDK), each wait told on stderr
    with its run, step, cause and length and the time waited in all, and the run goes on."""
    script = [http_error(429, "rate limited", retry_after=7), http_error(529, "Overloaded"),
              http_error(500, "internal", retry_after=0), http_error(529, "Overloaded", mid_stream=True),
              *conversion_script(None)]
    run, _ = run_script(tmp_path, script)
    assert (run.outcome, run.label, run.steps) == ("pass", "pass", 2)
    # retry-after honoured; without it, the backoff (doubled once per wait); an error event mid-stream is retried too;
    # each wait lengthened by a random share of up to JITTER
    (waits,) = slept.values()
    assert all(base <= wait <= base * (1 + main.JITTER) for wait, base in zip(waits, [7, 2, 0, 8], strict=True))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4 and all(line.startswith("run 000 step 1: ") for line in lines)
    assert "RateLimitError" in lines[0] and f"retrying in {waits[0]:.1f} s, {waits[0]:.1f} s waited in all" in lines[0]
    assert "OverloadedError" in lines[1] and f"{sum(waits):.1f} s waited in all (gives up past 600 s)" in lines[3]


def test_runs_that_meet_the_same_429_do_not_retry_in_lockstep(tmp_path, slept):
    opts = main.parse_args(["--level", "1", "--runs", "10", "--out", str(tmp_path)])
    sweep = main.run_sweep(opts, ISOLATE, "test", lambda run: ScriptedClient(
        [http_error(429, retry_after=7), reply(text("done"), stop_reason="end_turn")]))
    waits = [w for run in slept.values() for w in run]
    assert len(waits) == len(set(waits)) == 10 and all(7 <= w <= 7 * (1 + main.JITTER) for w in waits)
    assert all(r.label == "no_submission" for r in sweep.runs)


def test_an_endpoint_that_refuses_connections_ends_the_sweep_within_a_minute(tmp_path, slept, monkeypatch, capsys):
    """No request of the sweep gets an answer: every retry is told, the runs stop after CONNECT_BUDGET_S of waiting
    rather than 10 minutes a step, and the command exits 1 with a last line naming the endpoint and what to check.
    The waits are counted, not slept: the sweep's wall time is the time taken plus the longest run's waits."""
    with socket.socket() as bound:  # bound, never listening: every connection to it is refused
        bound.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{bound.getsockname()[1]}"
        monkeypatch.setenv("ANTHROPIC_BASE_URL", endpoint)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
        started = time.monotonic()
        code = main.main(["--level", "1", "--runs", "3", "--out", str(tmp_path / "s"), "--allow-unisolated"])
        taken = time.monotonic() - started
    assert code == 1
    assert taken + max(sum(waits) for waits in slept.values()) < 60
    err = capsys.readouterr().err.splitlines()
    retries = [line for line in err if "retrying in" in line]
    assert len(retries) >= 5 and all("APIConnectionError" in line and "[Errno 111]" in line for line in retries)
    assert err[-1].startswith(f"error: the sweep stopped: no answer from the API at {endpoint}")
    assert "check the network, any proxy (HTTPS_PROXY) and ANTHROPIC_BASE_URL" in err[-1]
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["graded"] == 0 and summary["runs_finished"] == 3 and set(summary["errors"]) == {"api_fatal"}


def test_a_connection_lost_mid_sweep_keeps_the_full_retry_budget_and_the_run_is_saved(tmp_path, slept, capsys):
    opts = main.parse_args(["--level", "1", "--runs", "2", "--concurrency", "1", "--out", str(tmp_path)])
    lost = [connection_error()] * 8  # waits of about 1 + 2 + ... + 60 s: past CONNECT_BUDGET_S, within RETRY_BUDGET_S
    clients = [ScriptedClient(conversion_script(None)), ScriptedClient([*lost, *conversion_script(None)])]
    main.run_sweep(opts, ISOLATE, "test", lambda run: clients[run.run_id])
    (waits,) = slept.values()
    assert len(waits) == 8 and sum(waits) > main.CONNECT_BUDGET_S
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["run_id"], r["outcome"]) for r in records] == [(0, "pass"), (1, "pass")]
    assert capsys.readouterr().err.count("run 001 step 1: APIConnectionError") == 8


def test_transient_errors_past_the_retry_budget_make_an_api_error(tmp_path, slept, monkeypatch):
    monkeypatch.setattr(main, "RETRY_BUDGET_S", 100)  # doublings from 1 s pass 100 s after 7 waits
    run, _ = run_script(tmp_path, [reply(tool_use("python", {"code": "1"})), *[http_error(529)] * 20])
    assert (run.outcome, run.label) == ("error", "api_error") and "OverloadedError (529)" in run.detail
    opts = main.parse_args(["--out", str(tmp_path / "s")])
    summary = Sweep(opts, Budget(opts, [run]), FixedSweep(opts), "test").summary()
    assert summary["graded"] == 0 and summary["errors"] == {"api_error": 1} and summary["pass_rate"] is None


@pytest.mark.parametrize("status, message", [(401, "invalid x-api-key"), (404, "model: claude-nope"),
                                             (403, "permission"), (400, "tools.0: bad schema")])
def test_fatal_errors_stop_the_whole_sweep_at_once(tmp_path, capsys, status, message):
    opts = main.parse_args(["--levels", "1-2", "--runs", "3", "--out", str(tmp_path), "--concurrency", "1"])
    clients = [ScriptedClient([http_error(status, message)])] + [ScriptedClient(conversion_script(None))] * 5
    sweep = main.run_sweep(opts, ISOLATE, "test", lambda run: clients[run.run_id])
    assert [r.label for r in sweep.runs] == ["api_fatal"] and sweep.budget.skipped == 5
    assert message in sweep.budget.fatal and str(status) in sweep.budget.fatal
    assert message in sweep.summary()["skipped_reason"]


def test_a_fatal_error_exits_non_zero_with_one_line_naming_the_cause(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    monkeypatch.setattr(main.anthropic, "AsyncAnthropic", lambda **_: ScriptedClient([http_error(401, "invalid x-api-key")]))
    code = main.main(["--runs", "4", "--out", str(tmp_path / "s"), "--allow-unisolated"])
    err = capsys.readouterr().err
    assert code == 1 and "the API refused the sweep" in err and "invalid x-api-key" in err


def test_context_overflow_is_the_models_failure(tmp_path):
    too_long = http_error(400, "prompt is too long: 210000 tokens > 200000 maximum")
    run, _ = run_script(tmp_path, [reply(tool_use("python", {"code": "1"})), too_long])
    assert (run.outcome, run.label) == ("fail", "context_overflow")


def test_pause_turn_is_sent_back_and_refusal_is_its_own_label(tmp_path):
    script = [reply(text("thinking long"), stop_reason="pause_turn"),
              reply(text("no"), stop_reason="refusal", stop_details={"type": "refusal", "category": "cyber"})]
    run, client = run_script(tmp_path, script)
    assert (run.outcome, run.label, run.steps) == ("fail", "refusal", 2)
    assert '"category": "cyber"' in run.detail
    resent = client.requests[1]["messages"]
    assert resent[-1]["role"] == "assistant" and resent[-1]["content"][0]["text"] == "thinking long"


def test_any_max_tokens_the_api_accepts_streams(tmp_path):
    """Non-streaming requests above ~21,333 max_tokens are refused by the SDK itself; streamed ones are not."""
    run, client = run_script(tmp_path, conversion_script(None), "--max-tokens", "64000", "--thinking", "60000")
    assert run.outcome == "pass" and all(r["stream"] is True for r in client.requests)
    with pytest.raises(SystemExit):
        main.parse_args(["--max-tokens", "64001"])


def test_a_harness_crash_is_recorded_and_other_runs_finish(tmp_path, monkeypatch):
    opts = main.parse_args(["--level", "1", "--runs", "2", "--out", str(tmp_path)])
    real = main.task.make_instance

    def broken(level, seed):
        if seed == 0:
            raise RuntimeError("boom")
        return real(level, seed)
    monkeypatch.setattr(main.task, "make_instance", broken)
    sweep = main.run_sweep(opts, ISOLATE, "test", lambda run: ScriptedClient(conversion_script(None)))
    by_id = {r.run_id: r for r in sweep.runs}
    assert by_id[0].label == "harness_error" and "boom" in by_id[0].detail
    assert by_id[1].outcome == "pass"


def test_a_decompression_bomb_fails_its_run_and_the_other_runs_finish(tmp_path):
    """The model writes the 2 KiB bz2 bomb (3 GiB inflated) and submits it, beside a run that passes."""
    opts = main.parse_args(["--level", "1", "--runs", "2", "--out", str(tmp_path), "--concurrency", "2"])
    write = f"open('bomb.npz', 'wb').write(bytes.fromhex({bz2_bomb().hex()!r}))"
    bomb = [reply(tool_use("python", {"code": write})), reply(tool_use("submit", {"path": "bomb.npz"}))]
    scripts = {0: bomb, 1: conversion_script(None)}
    by_id = {r.run_id: r for r in main.run_sweep(opts, ISOLATE, "test", lambda run: ScriptedClient(scripts[run.run_id])).runs}
    assert (by_id[0].outcome, by_id[0].label) == ("fail", "unreadable") and "zip method 12" in by_id[0].detail
    assert (by_id[1].outcome, by_id[1].label) == ("pass", "pass")


def test_step_budget_runs_out(tmp_path):
    steps = [reply(tool_use("python", {"code": "1"})) for _ in range(5)]
    run, client = run_script(tmp_path, steps, "--max-steps", "3")
    assert (run.outcome, run.label, run.steps, len(client.requests)) == ("fail", "max_steps", 3, 3)
    assert "at most 3 replies" in client.requests[0]["messages"][0]["content"][0]["text"]


@pytest.mark.parametrize("passes, n, low, high", [(3, 10, 0.1078, 0.6032), (0, 10, 0.0, 0.2775),
                                                   (10, 10, 0.7225, 1.0), (25, 100, 0.1755, 0.3430)])
def test_wilson_interval(passes, n, low, high):
    got = report.wilson_interval(passes, n)
    assert got == pytest.approx((low, high), abs=5e-4)


def test_runs_overlap_in_time(tmp_path):
    n, latency = 8, 0.25
    opts = main.parse_args(["--level", "1", "--runs", str(n), "--out", str(tmp_path), "--concurrency", str(n)])
    script = [reply(tool_use("python", {"code": "1"})), reply(tool_use("python", {"code": "2"})),
              reply(text("done"), stop_reason="end_turn")]
    start = time.monotonic()
    done = main.run_sweep(opts, ISOLATE, "test", lambda run: ScriptedClient(list(script), latency=latency)).runs
    elapsed = time.monotonic() - start
    serial = n * 3 * latency
    assert len(done) == n and all(r.label == "no_submission" for r in done)
    assert elapsed < serial / 2, f"{elapsed:.2f}s for {n} runs; one after another would take {serial:.1f}s"


def test_offline_mode_end_to_end(tmp_path, capsys):
    assert main.main(["--offline", "--level", "8", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "offline check OK" in out and "tp_fc1_merge" in out and "optimizer_chain" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["passes"] == 1 and summary["graded"] == summary["runs_planned"] == len(offline_scripts(8, 0))
    assert summary["failures"]["vocab_padding"] == 1 and not summary["errors"]
    assert len(list(tmp_path.glob("run-*/transcript.json"))) == summary["runs_planned"]


def test_no_key_exits_2_with_one_clear_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    r = subprocess.run([sys.executable, "main.py", "--out", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, check=False)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "ANTHROPIC_API_KEY" in r.stderr and "--offline" in r.stderr


def test_isolation_is_required_against_the_api_unless_waived(tmp_path):
    """With no bwrap on PATH: a sweep against the API refuses to start; offline runs go on, with a warning."""
    env = {"PATH": str(tmp_path / "empty"), "ANTHROPIC_API_KEY": "sk-test"}
    refused = subprocess.run([sys.executable, "main.py", "--out", str(tmp_path / "api")], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=False)
    assert refused.returncode == 2 and "--allow-unisolated" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "api").exists()
    cmd = [sys.executable, "main.py", "--offline", "--level", "1", "--out", str(tmp_path / "out")]
    degraded = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert degraded.returncode == 0 and degraded.stderr.count("WARNING: not isolated") == 1
    assert "offline check OK" in degraded.stdout
    assert "not isolated" in json.loads((tmp_path / "out" / "summary.json").read_text())["isolation"]


@pytest.mark.parametrize("start", [[], ["sh", "-c", 'trap "" INT; exec "$@"', "sh"]], ids=["plain", "sigint-ignored"])
def test_ctrl_c_cancels_the_rest_and_reports_what_finished(tmp_path, start):
    """Also when SIGINT was ignored at start, as for a job started with `&` from a script."""
    cmd = [*start, sys.executable, "-u", "main.py", "--offline", "--level", "5", "--concurrency", "1", "--out",
           str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("run 000"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    summary = json.loads((tmp_path / "summary.json").read_text())
    planned = len(offline_scripts(5, 0))
    assert 1 <= summary["runs_finished"] < summary["runs_planned"] == planned
    assert f"interrupted: {summary['runs_finished']} of {planned} runs finished" in out


FILL = "import os\nfor i in range(100):\n    with open(f'fill{i}', 'wb') as f: f.write(os.urandom(1 << 20))\n"


@pytest.mark.parametrize("then, steps", [
    ([reply(tool_use("submit", {"path": "fill0"}))], 2),
    ([reply(tool_use("python", {"code": "print('ignoring it')"}))], 2),
])
def test_a_workspace_left_over_its_quota_fails_the_run(then, steps, tmp_path, monkeypatch):
    monkeypatch.setattr(tools, "WORKSPACE_QUOTA_BYTES", 32 << 20)
    run, _ = run_script(tmp_path, [reply(tool_use("python", {"code": FILL})), *then])
    assert (run.outcome, run.label, run.steps) == ("fail", "disk_quota", steps)


def test_cleaning_up_after_the_quota_warning_lets_the_run_go_on(tmp_path, monkeypatch):
    monkeypatch.setattr(tools, "WORKSPACE_QUOTA_BYTES", 32 << 20)
    clean = "import glob, os\nfor p in glob.glob('fill*'): os.remove(p)"
    run, _ = run_script(tmp_path, [reply(tool_use("python", {"code": FILL})),
                                   reply(tool_use("python", {"code": clean})), *conversion_script(None)])
    assert (run.outcome, run.label) == ("pass", "pass")


def test_hostile_tool_inputs_and_files_end_as_a_labelled_fail_not_an_error(tmp_path):
    """Each of these once raised out of the harness; now each is a tool error or a graded fail."""
    hostile = [
        "import os\nos.symlink('loop_b', 'loop_a')\nos.symlink('loop_a', 'loop_b')",
        "raise ValueError('\\U0001F600' * 20000)",
        "import os\nfor fd in range(3, 64):\n    try: os.write(fd, b'garbage\\n')\n    except OSError: pass",
        "open('bad.npz', 'wb').write(b'PK\\x03\\x04' + bytes(100))",
    ]
    replies = [reply(tool_use("python", {"code": code})) for code in hostile]
    replies += [reply(tool_use("submit", {"path": "loop_a"})), reply(tool_use("submit", {"path": "x" * 5000})),
                reply(tool_use("submit", {"path": "bad.npz"}))]
    run, client = run_script(tmp_path, replies)
    assert (run.outcome, run.label) == ("fail", "unreadable"), run.detail
    outputs = [results_of(r)[0]["content"] for r in client.requests[1:]]
    assert "restarted" in outputs[2] and "Not submitted" in outputs[4] and "Not submitted" in outputs[5]


def test_run_lines_keep_one_column_for_steps_whatever_the_label():
    lines = [report.run_line(main.Run(0, 0, 7, outcome, label)) for label, outcome in report.RUN_LABELS.items()]
    assert len({line.index(" steps ") for line in lines}) == 1


def test_a_refused_submission_leaves_the_worker_and_its_variables(tmp_path, monkeypatch):
    """Every check that can refuse a submission runs before the worker is stopped."""
    refuse = {"left": 1}

    def copy_or_refuse(source, dest, max_bytes):
        if refuse["left"]:
            refuse["left"] -= 1
            raise main.SubmitError(f"{source.name} cannot be read: Permission denied")
        shutil.copy(source, dest)
    monkeypatch.setattr(tools, "copy_submission", copy_or_refuse)
    script = [reply(tool_use("python", {"code": "x = 41\nopen('a.npz', 'wb').write(b'x')"})),
              reply(tool_use("submit", {"path": "a.npz"})), reply(tool_use("python", {"code": "print(x + 1)"})),
              reply(tool_use("submit", {"path": "a.npz"}))]
    run, client = run_script(tmp_path, script)
    assert "Not submitted" in results_of(client.requests[2])[0]["content"]
    assert results_of(client.requests[3])[0]["content"] == "42\n"
    assert (run.outcome, run.label) == ("fail", "unreadable")


def test_records_carry_what_anyone_needs_and_workspaces_go(tmp_path):
    assert main.main(["--offline", "--level", "1", "--out", str(tmp_path / "s")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "s" / "results.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    for record in (*lines, summary):
        assert record["schema"] == SCHEMA_VERSION and record["task_version"] == task_version()
        assert record["model"] == "scripted" and record["max_tokens"] == flags.DEFAULT_MAX_TOKENS  # offline
        assert record["started_at"] <= record["ended_at"]
    assert {line["reward"] for line in lines} == {0.0, 1.0}
    # Offline, the submissions are the project's own scripted ones: none is kept
    assert not list((tmp_path / "s").glob("run-*/workspace")) and not list((tmp_path / "s").glob("run-*/*.npz"))
    assert len(list((tmp_path / "s").glob("run-*/transcript.*"))) == 2 * 4
    assert main.main(["--offline", "--level", "1", "--out", str(tmp_path / "k"), "--keep-workspaces"]) == 0
    assert len(list((tmp_path / "k").glob("run-*/workspace"))) == len(list((tmp_path / "k").glob("run-*/*.npz"))) == 4


def test_resume_refuses_a_sweep_made_with_other_task_code(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"task_version": "0123456789abcdef", "levels": [1]}))
    with pytest.raises(SystemExit):
        main.parse_args(["--resume", str(tmp_path)])
    assert "other task code" in capsys.readouterr().err
