"""Level sweeps: the table and recommendation, the spending cap, resuming, and report.html."""
import json
import math
import signal
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_main import ISOLATE

import flags
import main
import report
from budget import PRIOR_RUN_USAGE
from flags import DEFAULT_MAX_COST
from policy import FixedSweep
from scripted_api import ScriptedClient, conversion_script, reply, text, tool_use
from sweep import Sweep

ROOT = Path(__file__).resolve().parents[1]
GIVE_UP = [reply(text("I give up."), stop_reason="end_turn")]


def sweep(tmp_path, passes_per_level: dict[int, int], runs: int, *more: str, usage=None) -> Sweep:
    """Run a sweep whose level L passes passes_per_level[L] of `runs` times (the rest give up)."""
    levels = sorted(passes_per_level)
    opts = main.parse_args(["--levels", ",".join(map(str, levels)), "--runs", str(runs), "--out", str(tmp_path),
                            "--concurrency", "1", *more])
    return main.run_sweep(opts, ISOLATE, "test", lambda run: ScriptedClient(
        conversion_script(None) if run.seed < passes_per_level[run.level] else GIVE_UP, usage=usage))


def test_a_sweep_interleaves_levels_and_recommends_where_the_band_falls(tmp_path, capsys):
    s = sweep(tmp_path, {1: 3, 2: 2, 3: 0}, 3)
    assert [run.level for run in FixedSweep(s.opts).runs][:3] == [1, 2, 3]  # an early stop still covers every level
    summary = s.summary()
    rows = {r["level"]: r for r in summary["levels"]}
    assert [(rows[lv]["graded"], rows[lv]["passes"]) for lv in (1, 2, 3)] == [(3, 3), (3, 2), (3, 0)]
    assert rows[3]["top_failures"] == ["no_submission"] and rows[1]["overlaps_band"] is False
    assert rows[2]["wilson_95"] == pytest.approx([0.2077, 0.9385], abs=5e-5)  # Wilson 95% for 2 of 3, by hand
    assert "falls between level 2 (67%) and level 3 (0%)" in summary["recommendation"]
    command = summary["recommendation"].split("next: python main.py ")[1].split()
    run_cost, measured = s.budget.run_cost()  # the mean of these runs: each sent requests
    cap = math.ceil(20 * run_cost * report.CAP_MARGIN)
    assert measured and f"its 20 runs cost about ${20 * run_cost:.2f} at the measured ${run_cost:.2f} a run" in \
        summary["recommendation"]
    assert command == ["--levels", "2-3", "--model", "claude-haiku-4-5", "--seed", "3", "--max-steps", "40",
                       "--max-tokens", "16000", "--runs", "10", "--max-cost", str(max(1, cap))]
    follow = main.parse_args([*command, "--out", str(tmp_path / "next")])  # the command parses, with every flag kept
    assert (follow.levels, follow.model, follow.runs) == ([2, 3], s.opts.model, 10)
    assert follow.seed > max(run.seed for run in s.runs)  # fresh instances: none of those measured
    report.print_summary(summary)
    out = capsys.readouterr().out
    assert "no_submission" in out and summary["recommendation"] in out
    assert "3/3 done" not in out and "9/9 done" in out and "passes of graded runs L1 3/3 L2 2/3 L3 0/3" in out


@pytest.mark.parametrize("passes, expected", [
    ({5: 3, 6: 0}, "level 5 passes 30%, in the band, but its interval"),  # 3 of 10
    ({5: 10, 6: 9}, "every level passes above 40%, even level 6, the hardest there is"),
    ({2: 0, 3: 0}, ("every level passes below 10%; its 10 runs cost about $5.00 at the measured $0.50 a run; "
                    "next: python main.py --level 1 --runs 10 --max-cost 7")),
])
def test_recommendations(passes, expected):
    assert expected in report.recommend(rows_of(passes), 10, [1, 2, 3, 4, 5, 6], "", 0.5, True)


def rows_of(passes: dict[int, int]) -> list[dict]:
    """Level rows of 10 runs each, with passes[level] passes."""
    return [report.level_row(lv, [main.Run(i, i, lv, "pass" if i < n else "fail", "x") for i in range(10)],
                             flags.DEFAULT_MODEL, False) for lv, n in passes.items()]


def test_the_next_command_caps_its_runs_at_the_cost_per_run_or_says_there_is_no_price():
    rows = rows_of({2: 10, 3: 0})  # the band lies between: 20 more runs of each
    estimated = report.recommend(rows, 10, [2, 3], " --seed 10", 0.54, False)
    assert estimated.endswith("its 40 runs cost about $21.60 at the estimated $0.54 a run; next: python main.py "
                              "--levels 2-3 --seed 10 --runs 20 --max-cost 27")  # a quarter more than $21.60
    unpriced = report.recommend(rows, 10, [2, 3], "", None, False)
    assert unpriced.endswith("no price is known for the model, so this sets no cap; next: python main.py --levels 2-3 "
                             "--runs 20 --max-cost 0")


def test_a_level_inside_the_band_is_recommended():
    row = report.level_row(6, [main.Run(i, i, 6, "pass" if i < 25 else "fail", "x") for i in range(100)],
                           flags.DEFAULT_MODEL, False)
    assert report.recommend([row], 100, [6], "", 0.5, True).startswith("recommended level: 6 (25%")


def test_the_spending_cap_stops_new_runs(tmp_path, capsys):
    # Each run makes one request of 100k input and 10k output tokens: $0.15 at claude-haiku-4-5's prices.
    s = sweep(tmp_path, {1: 0}, 10, "--max-cost", "1", usage={"input_tokens": 100_000, "output_tokens": 10_000})
    # Six runs spend $0.90, under the cap, so a seventh may send its request; then the cap is reached.
    assert len(s.runs) == 7 and s.budget.skipped == 3
    summary = s.summary()
    assert summary["skipped"] == 3 and "$1.00" in summary["skipped_reason"]
    assert summary["spent_usd"] == pytest.approx(1.05) and summary["max_cost_usd"] == 1
    report.print_summary(summary)
    out = capsys.readouterr().out
    assert "skipped: 3 runs never started" in out and "$1.05 of the $1.00 cap" in out
    assert "interrupted" not in out  # the cap stopped it, and it says so


def looping(steps: int) -> list:
    return [reply(tool_use("python", {"code": "pass"})) for _ in range(steps)] + GIVE_UP


def capped_sweep(tmp_path, runs: int, concurrency: int, cap: str, usage: dict | None, steps: int = 10) -> Sweep:
    opts = main.parse_args(["--level", "1", "--runs", str(runs), "--out", str(tmp_path), "--max-cost", cap,
                            "--concurrency", str(concurrency), "--max-steps", str(steps + 2)])
    return main.run_sweep(opts, ISOLATE, "test", lambda run: ScriptedClient(looping(steps), latency=0.01, usage=usage))


def test_the_cap_bounds_spend_within_a_run(tmp_path):
    """10 requests of $1 each: the run is stopped after its first, neither pass nor fail."""
    s = capped_sweep(tmp_path, 3, 1, "1", {"input_tokens": 1_000_000, "output_tokens": 0})
    (run,) = s.runs
    assert (run.outcome, run.label, run.steps) == ("stopped", "spending_cap", 1) and s.budget.skipped == 2
    summary = s.summary()
    assert summary["spent_usd"] == pytest.approx(1.0) and summary["stopped"] == 1 and summary["graded"] == 0
    assert summary["pass_rate"] is None  # a stopped run is not in the pass rate


def test_with_many_runs_in_flight_the_overshoot_is_one_request_each(tmp_path):
    per_request = 0.10  # 100k input tokens
    s = capped_sweep(tmp_path, 12, 10, "5", {"input_tokens": 100_000, "output_tokens": 0})
    summary = s.summary()
    assert 5 <= summary["spent_usd"] <= 5 + 10 * per_request + 1e-9
    assert summary["stopped"] >= 1 and all(r.label == "spending_cap" for r in s.runs if r.outcome == "stopped")
    assert summary["stopped"] + summary["graded"] + summary["skipped"] == 12


def test_a_cap_below_the_prior_estimate_still_completes_cheap_runs(tmp_path):
    s = capped_sweep(tmp_path, 5, 5, "0.5", None, steps=2)  # the prior estimate of a haiku run is $0.54
    assert len(s.runs) == 5 and s.budget.skipped == 0 and all(r.outcome == "fail" for r in s.runs)


def test_an_unknown_model_with_a_cap_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    assert main.main(["--model", "some-new-model", "--out", str(tmp_path)]) == 2
    assert not list(tmp_path.iterdir())  # refused before anything started


def lines_of(results: Path) -> list[dict]:
    return [json.loads(line) for line in results.read_text().splitlines()]


def test_a_sweep_killed_and_resumed_ends_as_an_uninterrupted_one(tmp_path):
    cmd = [sys.executable, "-u", "main.py", "--offline", "--levels", "1-2", "--concurrency", "1"]
    whole = subprocess.run([*cmd, "--out", str(tmp_path / "whole")], cwd=ROOT, capture_output=True, text=True, check=False)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "cut")], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = 0
    for line in proc.stdout:
        seen += line.startswith("run ")
        if seen == 3:
            proc.send_signal(signal.SIGINT)
            break
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    before = lines_of(tmp_path / "cut" / "results.jsonl")
    assert 3 <= len(before) < len(lines_of(tmp_path / "whole" / "results.jsonl"))
    resumed = subprocess.run([sys.executable, "-u", "main.py", "--resume", str(tmp_path / "cut")], cwd=ROOT,
                             capture_output=True, text=True, check=False)
    assert resumed.returncode == 0 and "offline check OK" in resumed.stdout, resumed.stdout + resumed.stderr
    after = lines_of(tmp_path / "cut" / "results.jsonl")
    assert after[: len(before)] == before  # kept, not rerun
    numbers = [r["run_id"] for r in after]
    assert len(numbers) == len(set(numbers))
    outcome = lambda rows: sorted((r["level"], r["seed"], r["outcome"], r["label"]) for r in rows)
    assert outcome(after) == outcome(lines_of(tmp_path / "whole" / "results.jsonl"))


class Tables(HTMLParser):
    """The cells of each table by id, and the embedded summary."""

    def __init__(self):
        super().__init__()
        self.tables, self.current, self.row, self.cell, self.script, self.summary = {}, None, None, None, False, ""

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.current = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr" and self.current is not None:
            self.row = []
            self.current.append(self.row)
        elif tag in ("td", "th") and self.row is not None:
            self.cell = ""
        elif tag == "script" and attrs.get("id") == "summary":
            self.script = True

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.row.append(self.cell)
            self.cell = None
        elif tag == "table":
            self.current = None
        elif tag == "script":
            self.script = False

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data
        if self.script:
            self.summary += data


def test_report_html_holds_every_run_and_level_with_the_summary_numbers(tmp_path):
    assert main.main(["--offline", "--levels", "1-2", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    page = (tmp_path / "report.html").read_text()
    assert "http" not in page.replace("http://www.w3.org/2000/svg", "") and "<script src" not in page
    parsed = Tables()
    parsed.feed(page)
    sweep_rows = {row[0]: row for row in parsed.tables["levels"][1:]}
    for level in summary["levels"]:
        row = sweep_rows[str(level["level"])]
        assert (int(row[1]), int(row[2])) == (level["graded"], level["passes"])
    runs = parsed.tables["runs"][1:]
    assert len(runs) == summary["runs_finished"] == len(lines_of(tmp_path / "results.jsonl"))
    assert {r[1] for r in runs} == {"1", "2"}
    assert json.loads(parsed.summary) == summary
    for row in runs:
        transcript = tmp_path / f"run-{int(row[0].split()[1]):03d}" / "transcript.html"
        assert transcript.read_text().count(f"{row[3].upper()}</span> <b>{row[4]}</b>") == 1  # the grade, once


def offline_sweep(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-u", "main.py", *flags], cwd=ROOT, capture_output=True, text=True,
                          check=False)


@pytest.fixture
def finished(tmp_path) -> Path:
    out = tmp_path / "sweep"
    r = offline_sweep("--offline", "--level", "1", "--max-cost", "0", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def test_resume_redoes_a_run_whose_record_a_crash_cut_short(finished):
    results = finished / "results.jsonl"
    lines = results.read_text().splitlines()
    results.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    r = offline_sweep("--resume", str(finished))
    assert r.returncode == 0 and "offline check OK" in r.stdout, r.stdout + r.stderr
    assert "line 4: not a whole record" in r.stderr and "1 runs of level 1" in r.stdout


def test_resume_retries_errors_and_keeps_passes_and_fails(finished):
    results = finished / "results.jsonl"
    records = lines_of(results)
    before = dict(records[1])  # runs finish in any order: this may be the reference or a wrong conversion
    records[1] |= {"outcome": "error", "label": "api_error"}
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    r = offline_sweep("--resume", str(finished))
    assert r.returncode == 0 and "1 runs of level 1" in r.stdout and "3 kept from before" in r.stdout, r.stdout
    latest = {(x["level"], x["seed"]): x for x in lines_of(results)}
    rerun = latest[1, before["seed"]]
    assert (rerun["outcome"], rerun["label"]) == (before["outcome"], before["label"])  # the same script, run again


def test_resume_refuses_flags_that_differ_and_takes_a_new_cap(finished):
    r = offline_sweep("--resume", str(finished), "--runs", "20", "--levels", "1-3")
    assert r.returncode == 2 and "--runs (saved 10)" in r.stderr and "--levels (saved [1])" in r.stderr
    r = offline_sweep("--resume", str(finished), "--level", "3")
    assert r.returncode == 2 and "--levels (saved [1])" in r.stderr
    opts = main.parse_args(["--resume", str(finished)])
    assert opts.max_cost == 0 and opts.levels == [1]  # the saved cap: none
    assert main.main(["--resume", str(finished), "--max-cost", "7"]) == 0
    assert json.loads((finished / "config.json").read_text())["max_cost"] == 7


def test_resume_with_keys_missing_from_config_uses_the_defaults(finished, capsys):
    config = json.loads((finished / "config.json").read_text())
    del config["thinking"], config["max_steps"]
    (finished / "config.json").write_text(json.dumps(config))
    opts = main.parse_args(["--resume", str(finished)])
    assert opts.thinking == 0 and opts.max_steps == main.task.DEFAULT_MAX_STEPS and opts.levels == [1]
    assert "config.json has no max_steps, thinking; using the default" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [(["--seed", "-1"], "non-negative"), (["--level", "12"], "invalid choice"),
                                            (["--runs", "0"], "--runs must be a positive integer"), (["--concurrency", "-2"], "positive"),
                                            (["--levels", "0-3"], "levels must lie in 1-11"),
                                            (["--levels", "3-1"], "did you mean 1-3?"),
                                            (["--max-cost", "-1"], "--max-cost"), (["--max-cost", "nan"], "--max-cost"),
                                            (["--max-tokens", "64001"], "--max-tokens must be at most 64000")])
def test_bad_flags_are_refused_with_a_clear_message(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        main.parse_args(flags)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_levels_are_sorted_each_once_and_dated_models_are_priced(tmp_path):
    assert main.parse_args(["--levels", "7,5,5", "--out", str(tmp_path / "a")]).levels == [5, 7]
    assert report.price("claude-haiku-4-5-20251001") == report.price("claude-haiku-4-5") is not None
    prior = report.estimated_cost(flags.DEFAULT_MODEL, PRIOR_RUN_USAGE)
    assert flags.DEFAULT_RUNS * prior <= DEFAULT_MAX_COST  # the default command fits the default cap


def test_sweeps_never_share_or_merge_a_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, second = main.parse_args([]), main.parse_args([])
    assert first.out != second.out  # two sweeps started in the same second
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "results.jsonl").write_text("")
    with pytest.raises(SystemExit):
        main.parse_args(["--out", str(tmp_path / "used")])
    (tmp_path / "empty").mkdir()
    assert main.parse_args(["--out", str(tmp_path / "empty")]).out == tmp_path / "empty"


def test_an_output_path_that_cannot_be_made_is_a_clean_error(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main.main(["--offline", "--level", "1", "--out", str(tmp_path / "file" / "sub")]) == 2
    assert "--out" in capsys.readouterr().err


def test_an_offline_summary_shows_no_pass_rate_band_verdict_or_model(tmp_path, capsys):
    assert main.main(["--offline", "--level", "1", "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out.split("== summary ==")[1]
    assert "rate" not in out.split("\n")[1] and "band" not in out and "no level is recommended" in out
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["model"] == "scripted" and summary["runs_per_level"] is None
    assert summary["pass_rate"] is summary["wilson_95"] is summary["in_target_band"] is None
    assert all(row["rate"] is row["wilson_95"] is row["overlaps_band"] is None for row in summary["levels"])
    assert flags.DEFAULT_MODEL not in json.dumps(summary) and summary["graded"] == 4 and summary["passes"] == 1
