"""report.html and transcript.html as a reader sees them: rendered by headless Chromium (Debian's
`chromium`, which .ci/run installs), measured by a probe script added to a copy of each page."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium here (.ci/run installs Debian's chromium)")

# What the reader sees: whether the page scrolls sideways, and the text of every table cell.
PROBE = """<script>
const el = document.documentElement;
const tables = {};
for (const t of document.querySelectorAll('table')) {
  tables[t.id] = [...t.rows].map(r => [...r.cells].map(c => c.innerText.trim()));
}
const out = document.createElement('pre');
out.id = 'probe';
out.textContent = JSON.stringify({scroll: el.scrollWidth, width: window.innerWidth, title: document.title,
  text: document.body.innerText, links: [...document.links].map(a => a.getAttribute('href')), tables});
document.body.appendChild(out);
</script>"""


def seen(page: Path, width: int) -> dict:
    probe = page.with_name(f"probe-{page.name}")
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={width},900", "--virtual-time-budget=3000", "--dump-dom", probe.as_uri()],
                       capture_output=True, text=True, timeout=120, check=False)
    probe.unlink()
    found = re.search(r'<pre id="probe">(.*?)</pre>', r.stdout, re.DOTALL)
    assert found, r.stderr[-2000:]
    return json.loads(found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "s"
    assert main.main(["--offline", "--levels", "1,2", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("width", [700, 1300])
def test_the_report_shows_every_run_and_level_with_the_summarys_numbers(sweep_dir, width):
    view = seen(sweep_dir / "report.html", width)
    summary = json.loads((sweep_dir / "summary.json").read_text())
    results = [json.loads(line) for line in (sweep_dir / "results.jsonl").read_text().splitlines()]
    assert view["scroll"] <= view["width"], f"the page scrolls sideways at {width} px"
    assert view["title"].startswith("Scripted offline sweep")
    assert "no pass rate to read" in view["text"] and "overlaps" not in view["text"]  # no verdict for scripts
    for fact in ("date (UTC)", "flags", "task version", "output folder", "wall time", summary["task_version"]):
        assert fact.lower() in view["text"].lower(), fact
    levels = {row[0]: row for row in view["tables"]["levels"][1:]}
    for row in summary["levels"]:
        assert levels[str(row["level"])][1:3] == [str(row["graded"]), str(row["passes"])]
    runs = view["tables"]["runs"][1:]
    assert [r[0] for r in runs] == [f"run {r['run_id']:03d}" for r in sorted(results, key=lambda r: r["run_id"])]
    for row, record in zip(runs, sorted(results, key=lambda r: r["run_id"]), strict=True):
        assert row[3] == record["outcome"].upper() and row[4] == record["label"] and row[5] == str(record["steps"])
    assert all(f"run-{r['run_id']:03d}/transcript.html" in view["links"] for r in results)


@pytest.mark.parametrize("width", [700, 1300])
def test_a_transcript_numbers_its_steps_and_shows_the_grade_at_both_ends(sweep_dir, width):
    view = seen(sweep_dir / "run-000" / "transcript.html", width)
    assert view["scroll"] <= view["width"], f"the page scrolls sideways at {width} px"
    text = view["text"]
    assert text.count("PASS pass") == 2 and "step 1" in text and "step 2" in text and "tokens in" in text
    assert "../report.html" in view["links"] and "python call" in text and "wrote converted.npz" in text


def test_the_report_of_a_sweep_against_a_model_has_its_verdict_and_chart(tmp_path):
    from scripted_api import ScriptedClient, conversion_script, reply, text
    from sweep import Sweep
    opts = main.parse_args(["--levels", "1,2", "--runs", "2", "--out", str(tmp_path)])
    planned = main.plan(opts)
    clients = [ScriptedClient(conversion_script(None) if run.level == 1 else [reply(text("no"), stop_reason="end_turn")])
               for run, _, _ in planned]
    s = Sweep(opts, len(planned), "test")
    import asyncio
    asyncio.run(main.run_all([run for run, _, _ in planned], clients, opts, main.bwrap_usable(), s))
    view = seen(tmp_path / "report.html", 700)
    assert view["scroll"] <= view["width"] and view["title"].startswith("Sweep: claude-haiku-4-5")
    assert "target band 10%-40%" in view["text"] and "100%" in view["text"]
    levels = {row[0]: row for row in view["tables"]["levels"][1:]}
    assert levels["1"][3] == "100%" and levels["2"][3] == "0%"
