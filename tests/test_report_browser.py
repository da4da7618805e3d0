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

# What the reader sees: whether the page scrolls sideways, the text of every table cell, where each cell's text lies
# (and the box it can be seen in), the pieces of the flags line by line, and a transcript's grade and tool tags.
PROBE = """<script>
const el = document.documentElement;
const rects = node => {
  const range = document.createRange();
  range.selectNodeContents(node);
  return [...range.getClientRects()].filter(x => x.width > 0 && x.height > 0).map(x => [x.left, x.right, x.top, x.bottom]);
};
const tables = {}, layout = {};
for (const t of document.querySelectorAll('table')) {
  tables[t.id] = [...t.rows].map(r => [...r.cells].map(c => c.innerText.trim()));
  const box = (t.closest('.scroll') || document.body).getBoundingClientRect();
  layout[t.id] = {box: [box.left, box.right], rows: [...t.rows].map(r => {
    const b = r.getBoundingClientRect();
    return {shown: r.getClientRects().length > 0, top: b.top, bottom: b.bottom, cells: [...r.cells].map(c => ({
      label: c.dataset.label || null, before: getComputedStyle(c, '::before').content, rects: rects(c)}))};
  })};
}
const flags = {};
const flagBox = [...document.querySelectorAll('.meta div')].find(d => d.querySelector('b')?.innerText.trim().toLowerCase() === 'flags');
if (flagBox) {
  const pieces = [];
  let text = '';
  const walker = document.createTreeWalker(flagBox, NodeFilter.SHOW_TEXT);
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    if (n.parentElement.tagName !== 'B') { pieces.push([n, text.length]); text += n.data; }
  }
  const at = i => { const [n, start] = pieces.filter(p => p[1] <= i).pop(); return [n, Math.min(i - start, n.data.length)]; };
  for (const m of text.matchAll(/--[a-z-]+( [^\\s-]\\S*)?/g)) {
    const range = document.createRange();
    range.setStart(...at(m.index));
    range.setEnd(...at(m.index + m[0].length));
    flags[m[0]] = new Set([...range.getClientRects()].filter(x => x.width > 0).map(x => Math.round(x.top))).size;
  }
}
const out = document.createElement('pre');
out.id = 'probe';
out.textContent = JSON.stringify({scroll: el.scrollWidth, width: window.innerWidth, title: document.title,
  text: document.body.innerText, links: [...document.links].map(a => a.getAttribute('href')), tables, layout, flags,
  grades: document.querySelectorAll('.grade').length,
  tags: [...document.querySelectorAll('.tag')].map(t => t.innerText.trim())});
document.body.appendChild(out);
</script>"""
BAND_PX = 40  # a row's largest stretch with no visible text, top to bottom: about two lines


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


def hidden(view: dict, table: str) -> list[str]:
    """The cells with text outside what can be seen: past the window's edge or its table's box."""
    layout = view["layout"][table]
    left, right = layout["box"][0] - 1, min(layout["box"][1], view["width"]) + 1
    return [view["tables"][table][i][j] for i, row in enumerate(layout["rows"]) if row["shown"]
            for j, cell in enumerate(row["cells"]) if any(x[0] < left or x[1] > right for x in cell["rects"])]


def blank_bands(view: dict, table: str) -> list[float]:
    """Per shown row, its tallest stretch without any visible text (from its top, between lines, to its bottom)."""
    layout = view["layout"][table]
    left, right = layout["box"][0] - 1, min(layout["box"][1], view["width"]) + 1
    bands = []
    for row in (r for r in layout["rows"] if r["shown"]):
        spans = sorted((x[2], x[3]) for cell in row["cells"] for x in cell["rects"] if x[0] >= left and x[1] <= right)
        edge, gap = row["top"], 0.0
        for top, bottom in spans:
            gap, edge = max(gap, top - edge), max(edge, bottom)
        bands.append(max(gap, row["bottom"] - edge))
    return bands


def misaligned(view: dict, table: str) -> list[str]:
    """The columns whose header, when shown, shares neither its left nor its right text edge with every cell under
    it; when the header row is not shown (rows stacked), the columns whose cells do not show its label."""
    head, *rows = view["layout"][table]["rows"]
    names = view["tables"][table][0]
    if not head["shown"]:
        return [names[j] for row in rows for j, cell in enumerate(row["cells"])
                if cell["label"] != names[j] or cell["before"] != json.dumps(names[j])]
    bad = []
    for j, header in enumerate(head["cells"]):
        edges = [(min(x[0] for x in c["rects"]), max(x[1] for x in c["rects"])) for c in
                 [header, *(row["cells"][j] for row in rows)] if c["rects"]]
        if not any(all(abs(e[k] - edges[0][k]) < 2 for e in edges) for k in (0, 1)):
            bad.append(names[j])
    return bad


def readable(view: dict, width: int) -> None:
    """What every table and the flags must hold at any width."""
    assert view["scroll"] <= view["width"], f"the page scrolls sideways at {width} px"
    for table in view["tables"]:
        assert not hidden(view, table), f"{table}: text out of sight at {width} px: {hidden(view, table)}"
        assert max(blank_bands(view, table)) < BAND_PX, f"{table}: blank bands at {width} px"
        assert not misaligned(view, table), f"{table}: columns not aligned with their headers: {misaligned(view, table)}"
    assert view["flags"] and all(lines == 1 for lines in view["flags"].values()), f"a flag broken: {view['flags']}"


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
    readable(view, width)
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
def test_a_transcript_numbers_its_steps_states_its_grade_once_and_the_result_of_each_call(sweep_dir, width):
    view = seen(sweep_dir / "run-000" / "transcript.html", width)
    record = json.loads((sweep_dir / "run-000" / "transcript.json").read_text())
    assert view["scroll"] <= view["width"], f"the page scrolls sideways at {width} px"
    text = view["text"]
    assert view["grades"] == 1 and text.count(record["detail"]) == 1 and text.count("max |logit difference|") == 1
    assert "step 1" in text and "step 2" in text and "tokens in" in text
    assert "../report.html" in view["links"] and "python call" in text and "wrote converted.npz" in text
    calls = [i for i, tag in enumerate(view["tags"]) if tag.endswith(" call")]
    assert view["tags"][calls[-1]] == "submit call"
    assert all(i + 1 < len(view["tags"]) and view["tags"][i + 1].startswith("result") for i in calls), view["tags"]
    assert "the run ended here, PASS pass" in text  # the submit's result: how the run ended


def test_the_report_of_a_sweep_against_a_model_has_its_verdict_and_chart(tmp_path):
    from scripted_api import ScriptedClient, conversion_script, reply, text
    opts = main.parse_args(["--levels", "1,2", "--runs", "2", "--out", str(tmp_path)])
    main.run_sweep(opts, main.bwrap_usable(), "test", lambda run: ScriptedClient(
        conversion_script(None) if run.level == 1 else [reply(text("no"), stop_reason="end_turn")]))
    for width in (700, 1300):
        view = seen(tmp_path / "report.html", width)
        readable(view, width)
        assert view["title"] == "Sweep: claude-haiku-4-5, levels 1,2"
        assert "target band 10%-40%" in view["text"] and "100%" in view["text"]
        levels = {row[0]: row for row in view["tables"]["levels"][1:]}
        assert levels["1"][3] == "100%" and levels["2"][3] == "0%"
