"""report.html and each run's transcript.html: self-contained pages (no network, no scripts, no
framework) that a reviewer opens in any browser, from 700 px wide to wide screens: below STACK_BELOW px
each table row becomes a block of labelled fields, so no column is hidden off to the side."""
import json
from html import escape
from pathlib import Path

import report

STACK_BELOW = 1100  # px: the Runs table, its detail included, needs about 1070 px as a table
STYLE = """
*{box-sizing:border-box}body{font:15px/1.45 system-ui,sans-serif;color:#1d2330;background:#f6f7f9;margin:0}
main{max-width:1180px;margin:0 auto;padding:20px}h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.15em;margin:1.4em 0 .5em}
a{color:#1f5fa8}.meta{display:grid;grid-template-columns:repeat(auto-fit,minmax(210px,1fr));gap:6px 18px;
background:#fff;border:1px solid #d8dce3;border-radius:6px;padding:12px 14px}.meta div{overflow-wrap:anywhere}
.meta b{display:block;font-size:.78em;color:#5b6475;text-transform:uppercase;letter-spacing:.03em}
.scroll{overflow-x:auto;background:#fff;border:1px solid #d8dce3;border-radius:6px}
table{border-collapse:collapse;width:100%}th,td{padding:5px 9px;border-bottom:1px solid #e3e6eb;text-align:left;
vertical-align:top}th{background:#eef1f5;font-weight:600;white-space:nowrap}tr:nth-child(even){background:#fafbfc}
.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}td.wide{overflow-wrap:anywhere;min-width:14em}
.nowrap{white-space:nowrap}
.pass{color:#1a7f37;font-weight:600}.fail{color:#b42318;font-weight:600}.error,.stopped{color:#9a6700;font-weight:600}
.note{background:#fff8e1;border:1px solid #f0d98a;border-radius:6px;padding:8px 12px}
.chart{background:#fff;border:1px solid #d8dce3;border-radius:6px;padding:8px}.chart svg{width:100%;height:auto}
td:first-child{white-space:nowrap}pre{max-height:40em;overflow:auto;white-space:pre-wrap;overflow-wrap:anywhere;background:#fff;border:1px solid #d8dce3;border-radius:4px;padding:8px;
font:13px/1.4 ui-monospace,monospace;margin:.3em 0}.step{background:#fff;border:1px solid #d8dce3;border-radius:6px;
padding:8px 12px;margin:10px 0}.step h3{margin:.1em 0;font-size:1em}.step .usage{color:#5b6475;font-size:.85em}
.tag{display:inline-block;font-size:.78em;color:#5b6475;margin-top:.4em}.grade{font-size:1.05em;padding:8px 12px;
background:#fff;border:1px solid #d8dce3;border-radius:6px}.grade pre{margin:.4em 0 0}
@media (max-width:STACK_BELOWpx){table.stack thead{display:none}table.stack,table.stack tbody{display:block}
table.stack tr{display:flex;flex-wrap:wrap;gap:4px 12px;padding:7px 10px;border-bottom:1px solid #e3e6eb}
table.stack td{flex:1 0 7em;padding:0;border:0;text-align:left;white-space:normal}
table.stack td::before{content:attr(data-label);display:block;font-size:.72em;color:#5b6475;text-transform:uppercase;
letter-spacing:.03em}table.stack td.wide{flex-basis:100%;min-width:0}}
""".replace("STACK_BELOW", str(STACK_BELOW))


def page(title: str, body: str) -> str:
    return (f"<!doctype html>\n<html lang='en'><head><meta charset='utf-8'><meta name='viewport' "
            f"content='width=device-width,initial-scale=1'><title>{escape(title)}</title><style>{STYLE}</style>"
            f"</head><body><main>{body}</main></body></html>\n")


def meta(items: dict[str, str | list[str]]) -> str:
    """Labelled facts; a list is shown as pieces that a line may break between, never inside (flags, times)."""
    def shown(v: str | list[str]) -> str:
        return escape(v) if isinstance(v, str) else " ".join(f"<span class='nowrap'>{escape(x)}</span>" for x in v)
    return "<div class='meta'>" + "".join(f"<div><b>{escape(k)}</b>{shown(v)}</div>" for k, v in items.items()) + "</div>"


def table(table_id: str, columns: list[tuple[str, str]], rows: list[tuple[str, list[str]]]) -> str:
    """A table whose rows stack into labelled fields below STACK_BELOW px. columns: (header, kind), kind '' for
    text, 'num' for right-aligned numbers (header too), 'wide' for a cell on a line of its own when stacked.
    rows: (the row's id or '', its cells as HTML)."""
    head = "".join(f"<th class='{kind}'>{escape(name)}</th>" for name, kind in columns)
    body = "".join(
        (f"<tr id='{row_id}'>" if row_id else "<tr>")
        + "".join(f"<td class='{kind}' data-label='{escape(name)}'>{cell}</td>"
                  for (name, kind), cell in zip(columns, cells, strict=True)) + "</tr>"
        for row_id, cells in rows)
    return (f"<div class='scroll'><table id='{table_id}' class='stack'><thead><tr>{head}</tr></thead><tbody>{body}"
            "</tbody></table></div>")


def rate_chart(rows: list[dict], band: tuple[float, float]) -> str:
    """Each level's pass rate and 95% interval on a 0-100% axis with gridlines, over the shaded band (SVG)."""
    width, left, right, top, row_h = 760, 84, 24, 30, 30
    height = top + row_h * len(rows) + 30
    x = lambda p: left + p * (width - left - right)
    bottom = top + row_h * len(rows)
    parts = [(f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {width} {height}' role='img' "
             "aria-label='pass rate per level with its 95% interval, over the target band'>"),
             (f"<rect x='{x(band[0]):.1f}' y='{top}' width='{x(band[1]) - x(band[0]):.1f}' height='{bottom - top}' "
             "fill='#dcefdc'/>"),
             (f"<text x='{(x(band[0]) + x(band[1])) / 2:.1f}' y='{top - 10}' font-size='12' text-anchor='middle' "
             f"fill='#1a7f37'>target band {band[0]:.0%}-{band[1]:.0%}</text>")]
    for tick in range(0, 101, 10):
        parts.append(f"<line x1='{x(tick / 100):.1f}' x2='{x(tick / 100):.1f}' y1='{top}' y2='{bottom}' "
                     "stroke='#d8dce3'/>")
        parts.append(f"<text x='{x(tick / 100):.1f}' y='{bottom + 16}' font-size='11' text-anchor='middle' "
                     f"fill='#5b6475'>{tick}%</text>")
    parts.append(f"<line x1='{x(0)}' x2='{x(1):.1f}' y1='{bottom}' y2='{bottom}' stroke='#5b6475'/>")
    for i, row in enumerate(rows):
        y = top + row_h * i + row_h / 2
        parts.append(f"<text x='8' y='{y + 4:.1f}' font-size='13'>level {row['level']}</text>")
        if row["rate"] is None:
            parts.append(f"<text x='{x(0) + 6:.1f}' y='{y + 4:.1f}' font-size='12' fill='#5b6475'>no graded run</text>")
            continue
        low, high = row["wilson_95"]
        parts.append(f"<line x1='{x(low):.1f}' x2='{x(high):.1f}' y1='{y:.1f}' y2='{y:.1f}' stroke='#1d2330' "
                     "stroke-width='2'/>")
        parts.append(f"<circle cx='{x(row['rate']):.1f}' cy='{y:.1f}' r='5' fill='#1f5fa8'><title>level "
                     f"{row['level']}: {row['rate']:.0%} ({low:.0%}-{high:.0%})</title></circle>")
    return "".join(parts) + "</svg>"


def outcome(text: str) -> str:
    return f"<span class='{escape(text)}'>{escape(text.upper())}</span>"


def write_report(out: Path, summary: dict, runs: list) -> None:
    s, offline = summary, summary["offline"]
    levels = ",".join(map(str, s["levels_swept"]))
    swept = f"level{'s' if len(s['levels_swept']) > 1 else ''} {levels}"
    search = s.get("band_search")
    kind = "band search" if search else "sweep"
    title = f"Scripted offline {kind} (no model), {swept}" if offline else f"{kind.capitalize()}: {s['model']}, {swept}"
    chosen = ["--find-band", *(["--confirm"] if search["confirm"] else [])] if search else \
        [f"--levels {levels}", *([] if offline else [f"--runs {s['runs_per_level']}"])]  # offline: its scripts
    flags = [*chosen, f"--seed {s['seed']}", f"--max-steps {s['max_steps']}", f"--max-tokens {s['max_tokens']}",
             *([f"--thinking {s['thinking_budget']}"] if s["thinking_budget"] else []),
             "--offline" if offline else f"--max-cost {s['max_cost_usd'] or 0:g}"]
    header = meta({"date (UTC)": [s["started_at"], "to", s["ended_at"]], "model": "scripted replies" if offline else
                   s["model"], "flags": flags, "task version": s["task_version"], "output folder": s["out"],
                   "wall time": f"{s['wall_seconds']} s", "runs": f"{s['runs_finished']} of {s['runs_planned']} "
                   f"finished, {s['skipped']} skipped, {s['stopped']} stopped, {sum(s['errors'].values())} errors",
                   "spend": s["cost_text"], "sandbox": s["isolation"]})
    verdict = ("<p class='note'>The replies are scripted (the reference conversion and each known wrong one), so "
               "there is no pass rate to read and no level to recommend: this sweep checks the harness.</p>"
               if offline and not search else f"<p class='note'><b>{escape(s['recommendation'])}</b></p>")
    band = s["target_band"]
    level_columns = [("level", "num"), ("graded", "num"), ("passes", "num"),
                     *([] if offline else [("rate", "num"), ("95% Wilson", "num"),
                                           (f"overlaps {band[0]:.0%}-{band[1]:.0%}", "")]),
                     ("errors", "num"), ("top failures", ""), ("tokens", "num"), ("cost", "num")]
    level_rows = [("", [str(r["level"]), str(r["graded"]), str(r["passes"]),
                        *([] if offline else ["-" if r["rate"] is None else f"{r['rate']:.0%}",
                                              f"{r['wilson_95'][0]:.0%}-{r['wilson_95'][1]:.0%}",
                                              "yes" if r["overlaps_band"] else "no"]),
                        str(sum(1 for run in runs if run.level == r["level"] and run.outcome == "error")),
                        escape(", ".join(r["top_failures"]) or "-"), str(r["tokens"]),
                        "-" if r["cost_usd"] is None else f"{r['cost_usd']:.2f}"])
                  for r in s["levels"]]
    run_columns = [("run", ""), ("level", "num"), ("seed", "num"), ("outcome", ""), ("label", ""), ("steps", "num"),
                   ("tokens in/out", "num"), ("time", "num"), ("max error", "num"), ("detail", "wide")]
    run_rows = [(f"run-{r.run_id:03d}", run_cells(r)) for r in sorted(runs, key=lambda r: r.run_id)]
    embedded = json.dumps(s).replace("</", "<\\/")  # the numbers, machine-readable, safe inside <script>
    chart = "" if offline else f"<h2>Pass rate per level</h2><div class='chart'>{rate_chart(s['levels'], band)}</div>"
    body = (f"<h1>{escape(title)}</h1>{header}{verdict}{search_section(search, offline) if search else ''}"
            f"<h2>Levels</h2>{table('levels', level_columns, level_rows)}"
            f"{chart}<h2>Runs</h2>{table('runs', run_columns, run_rows)}"
            f"<script type='application/json' id='summary'>{embedded}</script>")
    (out / "report.html").write_text(page(title, body))


def search_section(search: dict, offline: bool) -> str:
    """The band search's path: a row per step, the level it ran and that level's count after it."""
    rows = [("", [str(i), str(p["level"]), str(p["runs"]), str(p["graded"]), str(p["passes"]),
                  f"{p['wilson_95'][0]:.0%}-{p['wilson_95'][1]:.0%}"]) for i, p in enumerate(search["path"], 1)]
    columns = [("step", "num"), ("level", "num"), ("runs at the level", "num"), ("graded", "num"), ("passes", "num"),
               ("95% Wilson", "num")]
    note = f"<p class='note'>{escape(report.OFFLINE_SEARCH)}.</p>" if offline else ""
    state = "ended" if search["finished"] else "stopped before its verdict"
    return (f"<h2>Band search ({state}, {search['runs']} runs{', --confirm' if search['confirm'] else ''})</h2>{note}"
            f"{table('search', columns, rows)}")


def run_cells(r) -> list[str]:
    error = "-" if r.max_error is None else f"{r.max_error:.3g}"
    detail = r.detail.strip().splitlines()[-1] if r.outcome == "error" and r.detail.strip() else r.detail
    return [f"<a href='run-{r.run_id:03d}/transcript.html'>run {r.run_id:03d}</a>", str(r.level), str(r.seed),
            outcome(r.outcome), escape(r.label), str(r.steps), f"{report.tokens_in(r.usage)}/{r.usage['output_tokens']}",
            f"{r.seconds:.1f} s", error, escape(detail[:300])]


def transcript_html(run) -> str:
    """A run's conversation as numbered steps, each with its tokens and time, and its grade once, at the top. A tool
    call that got no result (the submit that ended the run, and any call beside it) is shown with how the run ended."""
    fact = run.detail or (f"max |logit difference| {run.max_error:.3g}" if run.max_error is not None else "")
    grade = (f"<div class='grade'>{outcome(run.outcome)} <b>{escape(run.label)}</b> &middot; level {run.level}, "
             f"seed {run.seed}, {run.steps} steps, {run.seconds:.1f} s" + (f"<pre>{escape(fact)}</pre>" if fact else "")
             + "</div>")
    nav = "<p><a href='../report.html'>&larr; the sweep's report</a></p>"
    parts = [nav, f"<h1>run {run.run_id:03d}</h1>", grade]
    logs = {entry["step"]: entry for entry in run.step_log}
    answered = {b.get("tool_use_id") for m in run.messages if m["role"] == "user" and isinstance(m["content"], list)
                for b in m["content"]}
    ending = f"No result was sent: the run ended here, {run.outcome.upper()} {run.label}."
    step = 0
    for message in run.messages:
        content = message["content"]
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if message["role"] == "assistant":
            step += 1
            log = logs.get(step, {})
            usage = log.get("usage", {})
            timing = f"{log.get('api_seconds', 0):.1f} s model" + (f", {log['tool_seconds']:.1f} s tools"
                                                                 if "tool_seconds" in log else "")
            parts.append(f"<div class='step'><h3>step {step}</h3><div class='usage'>stop: "
                         f"{escape(str(log.get('stop_reason')))} &middot; tokens in {usage.get('input_tokens', 0)}, "
                         f"cache read {usage.get('cache_read_input_tokens', 0)}, out {usage.get('output_tokens', 0)}"
                         f" &middot; {timing}</div>")
        else:
            parts.append("<div class='step'>" + ("<h3>prompt</h3>" if step == 0 else ""))
        for block in blocks:
            parts.append(render_block(block, folded=step == 0))
            if block["type"] == "tool_use" and block["id"] not in answered:
                parts.append(f"<span class='tag'>result</span><pre>{escape(ending)}</pre>")
        parts.append("</div>")
    parts.append(nav)
    return page(f"run {run.run_id:03d}: {run.outcome} {run.label}", "".join(parts))


def render_block(block: dict, folded: bool) -> str:
    if block["type"] == "text":
        text = f"<pre>{escape(block['text'])}</pre>"
        return f"<details><summary>the prompt</summary>{text}</details>" if folded else text
    if block["type"] == "thinking":
        return f"<details><summary>thinking</summary><pre>{escape(block['thinking'])}</pre></details>"
    if block["type"] == "tool_use":
        body = block["input"].get("code") if isinstance(block["input"], dict) else None
        body = body if isinstance(body, str) else json.dumps(block["input"])
        return f"<span class='tag'>{escape(block['name'])} call</span><pre>{escape(body)}</pre>"
    if block["type"] == "tool_result":
        error = " (error)" if block.get("is_error") else ""
        return f"<span class='tag'>result{error}</span><pre>{escape(str(block['content']))}</pre>"
    return f"<pre>{escape(json.dumps(block))}</pre>"
