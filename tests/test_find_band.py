"""--find-band through the real agent loop, sandbox and grader: the band search's batches, the cap,
--resume, the summary and the page. The policy itself is tested without any API in test_band_search.py."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_main import ISOLATE
from test_sweep import GIVE_UP, Tables, lines_of

import main
from scripted_api import ScriptedClient, conversion_script

ROOT = Path(__file__).resolve().parents[1]
PER_REQUEST = {"input_tokens": 100_000, "output_tokens": 0}  # $0.10 a request at claude-haiku-4-5's prices


def scripted(run: main.Run) -> ScriptedClient:
    """Levels 7 and 5 fail every run, so the search goes down two rungs at a time to level 3, where a run
    passes if its seed is a multiple of 4: 3 of seeds 0-9, in the band."""
    passes = run.level == 3 and run.seed % 4 == 0
    return ScriptedClient(conversion_script(None) if passes else GIVE_UP, usage=PER_REQUEST)


def pairs(out: Path) -> list[tuple[int, int]]:
    return [(r["level"], r["seed"]) for r in lines_of(out / "results.jsonl")]


def test_a_search_stopped_by_the_cap_resumes_and_finishes_without_rerunning_a_recorded_run(tmp_path):
    out, concurrency, cap = tmp_path / "search", 5, 0.75
    opts = main.parse_args(["--find-band", "--out", str(out), "--max-cost", str(cap), "--concurrency", str(concurrency)])
    stopped = main.run_sweep(opts, ISOLATE, "test", scripted)
    first = stopped.summary()
    assert first["band_search"]["finished"] is False and first["band_search"]["level"] is None
    assert "the spending cap stopped the search" in first["recommendation"]
    # No request is sent once the spend reaches the cap: it is passed by at most one request per run in flight.
    assert cap <= first["spent_usd"] <= cap + concurrency * 0.10 + 1e-9
    before = lines_of(out / "results.jsonl")
    go_on = first["band_search"]["next"].split(": python main.py ")[1].split()
    assert go_on[:2] == ["--resume", str(out)] and go_on[2] == "--max-cost"

    resumed = main.run_sweep(main.parse_args(["--resume", str(out), "--max-cost", "10"]), ISOLATE, "test", scripted)
    after = lines_of(out / "results.jsonl")
    assert after[: len(before)] == before  # kept as recorded, not rerun
    assert len(pairs(out)) == len(set(pairs(out))) and len({r["run_id"] for r in after}) == len(after)
    search = resumed.summary()["band_search"]
    assert search["finished"] and search["level"] == 3 and search["runs"] == len(after)
    assert [step["level"] for step in search["path"]][:3] == [7, 5, 3]
    # The closing line says what confirming would cost, as a command that parses and resumes this search.
    confirm = search["next"].split(": python main.py ")[1].split()
    assert "confirming would take about" in search["next"] and "--confirm" in confirm
    follow = main.parse_args(confirm)
    assert follow.confirm and follow.find_band and follow.out == out and follow.max_cost > resumed.budget.spent()


def test_offline_the_search_runs_end_to_end_and_says_its_answer_means_nothing(tmp_path):
    out = tmp_path / "offline"
    r = subprocess.run([sys.executable, "-u", "main.py", "--offline", "--find-band", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "offline check OK" in r.stdout and "means nothing about any model" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    search = summary["band_search"]
    assert len({step["level"] for step in search["path"]}) >= 2 and search["runs"] == summary["runs_finished"]
    assert search["finished"] and search["level"] in summary["levels_swept"]
    assert search["text"] in r.stdout and len(pairs(out)) == len(set(pairs(out)))
    page = Tables()
    page.feed((out / "report.html").read_text())
    steps = page.tables["search"][1:]
    assert [int(row[1]) for row in steps] == [step["level"] for step in search["path"]]
    assert "means nothing about any model" in (out / "report.html").read_text()


@pytest.mark.parametrize("flags, message", [(["--confirm"], "--confirm goes with --find-band"),
                                            (["--find-band", "--levels", "2-4"], "drop --level, --levels and --runs")])
def test_the_search_flags_are_checked(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        main.parse_args(flags)
    assert e.value.code == 2 and message in capsys.readouterr().err
