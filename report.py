"""The numbers of a sweep: statistics per level, the recommendation, costs, the labels a run can
end with, and the console's lines. The pages (report.html, transcript.html) are in report_html.py."""
import argparse
import itertools
import math
import re
from collections import Counter

from conversions import MISTAKES

TARGET_BAND = (0.10, 0.40)
HALF_WIDTH = 0.15  # the interval half-width a recommended rerun aims for
USAGE_KEYS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
# USD per million tokens (input, output); cache writes cost 1.25x input, cache reads 0.1x.
PRICES = {"claude-haiku-4-5": (1.0, 5.0), "claude-sonnet-4-5": (3.0, 15.0), "claude-opus-4-5": (5.0, 25.0)}
# Every label a run can end with, and its outcome: pass and fail are graded, error and stopped are not (a run
# stopped by another run's fatal API error is `stopped` with the label api_fatal; stop_<reason> is a fail).
RUN_LABELS = {"pass": "pass",
              **dict.fromkeys([*MISTAKES, "precision", "other", "missing_key", "bad_shape", "bad_dtype", "not_finite",
                               "unreadable", "too_large", "no_submission", "max_steps", "disk_quota", "context_overflow",
                               "refusal"], "fail"),
              **dict.fromkeys(["api_error", "api_fatal", "harness_error", "ungradable"], "error"),
              "spending_cap": "stopped"}
LABEL_WIDTH = max(map(len, RUN_LABELS))  # so the console keeps its columns


def wilson_interval(passes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    p = passes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def price(model: str) -> tuple[float, float] | None:
    """USD per million input and output tokens; a dated id (claude-haiku-4-5-20251001) costs what its alias does."""
    return PRICES.get(re.sub(r"-\d{8}$", "", model))


def estimated_cost(model: str, usage: dict[str, int]) -> float | None:
    if price(model) is None:
        return None
    price_in, price_out = price(model)
    return (usage["input_tokens"] * price_in + usage["cache_creation_input_tokens"] * price_in * 1.25
            + usage["cache_read_input_tokens"] * price_in * 0.1 + usage["output_tokens"] * price_out) / 1e6


def level_row(level: int | None, runs: list, model: str, offline: bool) -> dict:
    graded = [r for r in runs if r.outcome in ("pass", "fail")]  # errors and runs the cap stopped are left out
    passes = sum(r.outcome == "pass" for r in graded)
    low, high = wilson_interval(passes, len(graded))
    failures = dict(Counter(r.label for r in graded if r.outcome == "fail").most_common())
    usage = sum((Counter(r.usage) for r in runs), Counter())
    # Scripted replies measure no model: offline, there is no rate, interval or band verdict to give.
    return {"level": level, "runs": len(runs), "graded": len(graded), "passes": passes,
            "rate": passes / len(graded) if graded and not offline else None,
            "wilson_95": None if offline else [low, high],
            "overlaps_band": None if offline else bool(graded) and low <= TARGET_BAND[1] and high >= TARGET_BAND[0],
            "top_failures": list(failures)[:2], "failures": failures,
            "tokens": sum(usage[k] for k in USAGE_KEYS),
            "cost_usd": None if offline else estimated_cost(model, {k: usage[k] for k in USAGE_KEYS})}


CAP_MARGIN = 1.25  # a suggested cap allows a quarter more than the expected cost: runs vary


def recommend(rows: list[dict], runs_per_level: int, levels_available: list[int], flags: str,
              run_cost: float | None, measured: bool) -> str:
    """The level whose interval lies inside the band, or where to look next, as a command that carries the sweep's
    other flags (`flags`, fresh seeds among them) and a cap that covers its runs at `run_cost` a run (None: no price
    is known, so no cap), its expected cost said before it."""
    text, follow = _recommend(rows, runs_per_level, levels_available)
    if follow is None:
        return text
    first, last, runs = follow
    levels, n = f"--level {first}" if first == last else f"--levels {first}-{last}", (last - first + 1) * runs
    if run_cost is None:
        return (f"{text}; no price is known for the model, so this sets no cap; next: python main.py {levels}{flags} "
                f"--runs {runs} --max-cost 0")
    cost = n * run_cost
    return (f"{text}; its {n} runs cost about ${cost:.2f} at the {'measured' if measured else 'estimated'} "
            f"${run_cost:.2f} a run; next: python main.py {levels}{flags} --runs {runs} "
            f"--max-cost {max(1, math.ceil(cost * CAP_MARGIN))}")


def _recommend(rows: list[dict], runs_per_level: int, levels_available: list[int]
               ) -> tuple[str, tuple[int, int, int] | None]:
    """What the rows say, and the follow-up sweep if there is one: (first level, last level, runs per level)."""
    low_band, high_band = TARGET_BAND
    graded = [r for r in rows if r["graded"]]
    if not graded:
        return "no graded run yet", None
    inside = [r for r in graded if low_band <= r["wilson_95"][0] and r["wilson_95"][1] <= high_band]
    if inside:
        r = inside[0]
        return (f"recommended level: {r['level']} ({r['rate']:.0%}, 95% interval {r['wilson_95'][0]:.0%}-"
                f"{r['wilson_95'][1]:.0%}, inside the band)"), None
    more = max(2 * runs_per_level, 10)
    for r in graded:
        if low_band <= r["rate"] <= high_band:
            p = r["rate"]
            need = max(more, math.ceil(1.96**2 * max(p * (1 - p), 0.09) / HALF_WIDTH**2))
            return (f"level {r['level']} passes {p:.0%}, in the band, but its interval {r['wilson_95'][0]:.0%}-"
                    f"{r['wilson_95'][1]:.0%} is wider"), (r["level"], r["level"], need)
    for a, b in itertools.pairwise(graded):
        if a["rate"] > high_band and b["rate"] < low_band:
            return (f"no level passes inside the band; it falls between level {a['level']} ({a['rate']:.0%}) and "
                    f"level {b['level']} ({b['rate']:.0%})"), (a["level"], b["level"], more)
    harder = [lv for lv in levels_available if lv > graded[-1]["level"]]
    easier = [lv for lv in levels_available if lv < graded[0]["level"]]
    if all(r["rate"] > high_band for r in graded):
        return (f"every level passes above {high_band:.0%}", (harder[0], harder[-1], runs_per_level)) if harder else \
            (f"every level passes above {high_band:.0%}, even level {graded[-1]['level']}, the hardest there is", None)
    if all(r["rate"] < low_band for r in graded):
        return (f"every level passes below {low_band:.0%}", (easier[0], easier[-1], runs_per_level)) if easier else \
            (f"every level passes below {low_band:.0%}, even level {graded[0]['level']}, the easiest there is", None)
    return ("no level passes inside the band and the rates are not ordered",
            (graded[0]["level"], graded[-1]["level"], more))


def print_table(s: dict) -> None:
    """One row per level; an offline sweep's scripted replies have no pass rate to show, nor a band verdict."""
    rated = not s["offline"]
    print(f"{'level':>5} {'graded':>6} {'passes':>6} " + (f"{'rate':>5}  {'95% Wilson':<10} {'band':<4} " if rated else "")
          + f"{'top failures':<32} {'tokens':>9} {'cost':>7}")
    for r in s["levels"]:
        rate = "-" if r["rate"] is None else f"{r['rate']:.0%}"
        cost = "-" if r["cost_usd"] is None else f"${r['cost_usd']:.2f}"
        verdict = ""
        if rated:
            interval = f"{r['wilson_95'][0]:.0%}-{r['wilson_95'][1]:.0%}"
            verdict = f"{rate:>5}  {interval:<10} {'yes' if r['overlaps_band'] else 'no':<4} "
        print(f"{r['level']:>5} {r['graded']:>6} {r['passes']:>6} {verdict}{', '.join(r['top_failures']):<32} "
              f"{r['tokens']:>9} {cost:>7}")
    print(s["recommendation"])


OFFLINE_SEARCH = ("offline: this search's runs are scripted from a made-up pass-rate curve (OFFLINE_PASS_RATE in "
                  "scripted_api.py), so its answer means nothing about any model; it checks the search's machinery")


def search_path(search: dict) -> str:
    """The band search's path on one line: each step's level and that level's passes, graded runs and interval."""
    steps = [f"L{p['level']} {p['passes']}/{p['graded']} ({p['wilson_95'][0]:.0%}-{p['wilson_95'][1]:.0%})"
             for p in search["path"]]
    return f"search path ({search['runs']} runs): " + " -> ".join(steps)


def tally(runs: list, levels: list[int]) -> str:
    """The progress line's count, as the summary counts: passes of graded runs per level, errors and
    stopped runs apart (they are not attempts at the task)."""
    parts = []
    for lv in levels:
        mine = [r for r in runs if r.level == lv]
        graded = [r for r in mine if r.outcome in ("pass", "fail")]
        other = Counter(r.outcome for r in mine if r.outcome not in ("pass", "fail"))
        extra = "".join(f" +{n} {kind}" for kind, n in sorted(other.items()))
        parts.append(f"L{lv} {sum(r.outcome == 'pass' for r in graded)}/{len(graded)}{extra}")
    return "passes of graded runs " + " ".join(parts)


def tokens_in(usage: dict[str, int]) -> int:
    """Every input token a run sent: uncached, read from the cache and written to it."""
    return usage["input_tokens"] + usage["cache_read_input_tokens"] + usage["cache_creation_input_tokens"]


def run_line(run) -> str:  # a main.Run
    tokens = f"{tokens_in(run.usage)}/{run.usage['output_tokens']}"
    return (f"run {run.run_id:03d} L{run.level} seed {run.seed:<6} {run.outcome.upper():7} {run.label:<{LABEL_WIDTH}} "
            f"steps {run.steps:<3} tokens in/out {tokens:<14} {run.seconds:6.1f}s")


def next_flags(opts: argparse.Namespace) -> str:
    """The sweep's flags that a follow-up command must carry (all but the levels, runs and cap it picks), with the
    first seed after those this sweep measured, so that no instance is run again."""
    flags = (f" --model {opts.model} --seed {opts.seed + opts.runs} --max-steps {opts.max_steps} "
             f"--max-tokens {opts.max_tokens}")
    return flags + (f" --thinking {opts.thinking}" if opts.thinking else "")


def print_summary(s: dict) -> None:
    print("\n== summary ==")
    if s["runs_finished"] + s["skipped"] < s["runs_planned"]:
        print(f"interrupted: {s['runs_finished']} of {s['runs_planned']} runs finished")
    if s["skipped"]:
        print(f"skipped: {s['skipped']} runs never started: {s['skipped_reason']}")
    if s["stopped"]:
        again = "a resumed search makes fresh runs instead" if "band_search" in s else "--resume starts them over"
        print(f"stopped: {s['stopped']} runs ended unfinished ({s['skipped_reason'] or 'the sweep stopped'}), neither "
              f"pass nor fail (not in the pass rate); {again}")
    print_table(s)
    if "band_search" in s:
        print(search_path(s["band_search"]))
    if "band_search" in s and s["offline"]:
        print(OFFLINE_SEARCH)
    if s["errors"]:
        print(f"errors (not in the pass rate): {sum(s['errors'].values())} "
              + ", ".join(f"{k} {v}" for k, v in s["errors"].items()))
    t = s["tokens"]
    print(f"tokens: input {t['input']}, output {t['output']}, cache write {t['cache_write']}, "
          f"cache read {t['cache_read']}; estimated cost {s['cost_text']}")
    thinking = f"{s['thinking_budget']} tokens" if s["thinking_budget"] else "off"
    print(f"wall time {s['wall_seconds']}s; extended thinking {thinking}; sandbox: {s['isolation']}")
