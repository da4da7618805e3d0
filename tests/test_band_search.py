"""The band search (band_search.py), without an API: runs are drawn from given pass-rate curves over
the levels, 200 searches per curve, seeded. `python tests/test_band_search.py` prints the table of
measured figures that docs/report.md quotes."""
import itertools
import math
import random
import statistics
import sys
from collections import namedtuple
from functools import cache
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so that the script runs too
import band_search as bs
from band_search import CRITERION_MET, INTERVAL, RATE, Batch, Tally, Verdict
from report import TARGET_BAND, wilson_interval

Run = namedtuple("Run", "level seed outcome")  # what the search reads of a main.Run
SEARCHES = 200
# The true pass rate of levels 1 to 11.
CURVES = {
    "steep": (1, 1, 1, .99, .97, .9, .7, .25, .03, 0, 0),
    "shallow": (.97, .93, .86, .77, .66, .54, .42, .31, .21, .13, .07),
    "bottom": (.25, .06, .01, 0, 0, 0, 0, 0, 0, 0, 0),
    "top": (1, 1, 1, 1, 1, 1, 1, .97, .9, .7, .25),
    "none": (1, 1, 1, 1, .95, .8, .6, .04, 0, 0, 0),  # no level in the band: it falls between 7 and 8
    "easy": (1,) * 10 + (.75,),  # every level above the band
    "hard": (.03,) + (0,) * 10,  # every level below it
    # Level 8 lies in the band but near its edge: confirming it takes ~860 runs, past the run limit.
    # Measured and printed, not held to the 90%.
    "edge": (1, 1, 1, 1, .95, .85, .45, .12, .01, 0, 0),
}


def answer(curve: tuple) -> tuple[str, tuple[int, ...]]:
    """What a search should name: the levels whose true rate lies in the band, else the pair that
    straddles it, else the hardest (easiest) level when every level passes above (below) it."""
    inside = tuple(lv for lv, p in enumerate(curve, 1) if TARGET_BAND[0] <= p <= TARGET_BAND[1])
    if inside:
        return "in_band", inside
    above = [lv for lv, p in enumerate(curve, 1) if p > TARGET_BAND[1]]
    if not above:
        return "below", (1,)
    return ("above", (11,)) if above[-1] == 11 else ("between", (above[-1], above[-1] + 1))


def right(v: Verdict, curve: tuple) -> bool:
    kind, levels = answer(curve)
    return v.kind == kind and (v.levels[0] in levels if kind == "in_band" else v.levels == levels)


def search(curve: tuple, confirm: bool, rng: random.Random) -> tuple[Verdict, list[Run], int]:
    """One search to its verdict: the verdict, the runs, and the batches (each one waits for the last)."""
    runs: list[Run] = []
    batches = 0
    while isinstance(step := bs.next_step(runs, confirm), Batch):
        pairs, batches = step.pairs, batches + 1
        assert len(set(pairs)) == len(pairs) and not set(pairs) & {(r.level, r.seed) for r in runs}  # fresh
        runs += [Run(lv, seed, "pass" if rng.random() < curve[lv - 1] else "fail") for lv, seed in pairs]
    return step, runs, batches


def fixed_runs_per_level(curve: tuple, confirm: bool) -> int:
    """N of the fixed sweep `--levels 1-11 --runs N` that finds the same answer. Without confirm, the
    criterion's 10 graded runs. With confirm, the fewest runs at which it confirms the answer at least
    half the time: the interval of a level in the band lies inside it, or those of the straddling pair
    (of the end level) lie outside it. Generous: the fixed sweep knows N beforehand."""
    if not confirm:
        return bs.CRITERION
    kind, levels = answer(curve)

    def chance(n: int) -> float:
        odds = [chance_settled(curve[lv - 1], n) for lv in levels]
        return max(odds) if kind == "in_band" else math.prod(odds)
    return next(n for n in itertools.count(bs.CRITERION) if chance(n) >= 0.5)


def chance_settled(p: float, n: int) -> float:
    """The chance that n runs at a true pass rate p (0 < p < 1) put the interval on p's side of the band."""
    log_pmf = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p)
               + (n - k) * math.log(1 - p) for k in range(n + 1)]
    return sum(math.exp(log_pmf[k]) for k in range(n + 1)
               if bs.side(k / n) == bs.side(p) and bs.settled(Tally(n, k), INTERVAL))


@cache
def measure(name: str, confirm: bool) -> dict:
    """The searches' figures for one curve, beside those of the fixed sweep, drawn just as often."""
    curve, wanted = CURVES[name], INTERVAL if confirm else CRITERION_MET
    rng = random.Random(f"{name} {confirm}")
    results = [search(curve, confirm, rng) for _ in range(SEARCHES)]
    runs = sorted(len(r) for _, r, _ in results)
    n, draws = fixed_runs_per_level(curve, confirm), np.random.default_rng(len(name) + confirm)
    fixed = [bs.verdict({lv: Tally(n, int(draws.binomial(n, p))) for lv, p in enumerate(curve, 1)}, wanted)
             for _ in range(SEARCHES)]
    return {"verdicts": [v for v, _, _ in results],
            "right": sum(v.evidence == wanted and right(v, curve) for v, _, _ in results) / SEARCHES,
            "wrong": sum(v.evidence == wanted and not right(v, curve) for v, _, _ in results) / SEARCHES,
            "median": statistics.median(runs), "p90": runs[int(0.9 * SEARCHES)],
            "batches": statistics.median(b for _, _, b in results),
            "fixed_n": n, "fixed": n * len(curve),
            "fixed_right": sum(v is not None and right(v, curve) for v in fixed) / SEARCHES}


ASSERTED = [name for name in CURVES if name != "edge"]


@pytest.mark.parametrize("name", [n for n in ASSERTED if answer(CURVES[n])[0] == "in_band"])
def test_with_confirm_the_search_names_a_level_in_the_band(name):
    assert measure(name, True)["right"] >= 0.9


@pytest.mark.parametrize("name", [n for n in ASSERTED if answer(CURVES[n])[0] != "in_band"])
def test_where_no_level_is_in_the_band_the_search_says_so_and_names_the_pair(name):
    assert measure(name, True)["right"] >= 0.9
    kind, levels = answer(CURVES[name])
    # Without confirm the criterion can take a level just off the band for one in it (1 pass in 10
    # at a true 4%), but when it says that no level is in the band it names the right levels.
    said_none = [v for v in measure(name, False)["verdicts"] if v.kind != "in_band"]
    assert said_none and all((v.kind, v.levels) == (kind, levels) for v in said_none)


@pytest.mark.parametrize("confirm", [False, True], ids=["criterion", "confirm"])
@pytest.mark.parametrize("name", CURVES)
def test_the_search_takes_at_most_half_the_runs_of_the_fixed_sweep(name, confirm):
    m = measure(name, confirm)
    assert m["median"] <= m["fixed"] / 2


def test_a_search_starts_with_a_few_runs_at_the_default_level_from_the_base_seed():
    assert bs.next_step([], base_seed=100) == Batch(7, (100, 101, 102, 103, 104))


def test_it_moves_up_from_a_level_above_the_band_and_down_from_one_below_two_rungs_on_a_big_gap():
    def at(level, passes, fails):
        return [Run(level, s, "pass" if s < passes else "fail") for s in range(passes + fails)]
    assert bs.next_step(at(7, 5, 0)).level == 9  # passed every run
    assert bs.next_step(at(7, 3, 1)).level == 8
    assert bs.next_step(at(7, 0, 5)).level == 5  # failed every run
    assert bs.next_step(at(7, 5, 0) + at(9, 0, 5)).level == 8  # the middle of the gap
    assert bs.next_step(at(7, 2, 3)) == Batch(7, (5, 6, 7, 8, 9))  # in the band: up to the criterion's 10


def test_seeds_stay_fresh_when_runs_were_stopped_or_recorded_again():
    runs = [Run(7, 0, "pass"), Run(7, 1, "stopped"), Run(7, 1, "fail"), Run(7, 3, "fail"), Run(7, 4, "error")]
    assert bs.tallies(runs) == {7: Tally(3, 1)}  # (7, 1) counts by its latest record; the error is no attempt
    assert bs.next_step(runs) == Batch(7, (2, 5, 6, 7, 8, 9, 10))


def test_runs_that_keep_ending_in_errors_stop_the_search_but_runs_the_cap_stopped_do_not():
    v = bs.next_step([Run(7, s, "error") for s in range(5)])
    assert isinstance(v, Verdict) and v.kind == "open" and "5 of 5 runs ended in an error" in v.text
    assert bs.next_step([Run(7, s, "stopped") for s in range(5)]) == Batch(7, (5, 6, 7, 8, 9))  # --resume goes on


def test_the_run_limit_stops_the_search_with_the_best_reading_so_far():
    runs = [Run(7, s, "pass" if s < 2 else "fail") for s in range(8)]
    v = bs.next_step(runs, max_runs=8)
    assert (v.kind, v.levels, v.evidence) == ("in_band", (7,), RATE) and v.text.startswith("the run limit came first")
    assert bs.summary(runs, v)["level"] is None  # 8 runs do not meet the criterion


def test_runs_needed_is_where_the_wilson_interval_clears_the_band():
    for n in range(bs.CRITERION, 150):
        for passes in range(n + 1):
            t = Tally(n, passes)
            assert bs.settled(t, INTERVAL) == (n >= bs.runs_needed(t.rate)), (passes, n)


def test_the_summary_has_a_step_per_stretch_at_one_level():
    runs = ([Run(7, s, "pass") for s in range(5)] + [Run(9, s, "fail") for s in range(5)]
            + [Run(8, s, "pass" if s < 3 else "fail") for s in range(10)])
    v = bs.next_step(runs)
    assert (v.kind, v.levels, v.evidence) == ("in_band", (8,), CRITERION_MET)
    s = bs.summary(runs, v)
    assert [(p["level"], p["runs"], p["passes"]) for p in s["path"]] == [(7, 5, 5), (9, 5, 0), (8, 10, 3)]
    assert s["path"][-1]["wilson_95"] == list(wilson_interval(3, 10))
    assert (s["runs"], s["level"], s["verdict"]) == (20, 8, "in_band")


def table() -> str:
    head = ("| curve: pass rate of levels 1-11 | mode | right | wrong | median runs | 90th pct | median batches | "
            "fixed sweep | fixed right |")
    rows = [head, "|---" * (head.count("|") - 1) + "|"]
    for name, curve in CURVES.items():
        for confirm in (False, True):
            m = measure(name, confirm)
            rates = " ".join(f"{p:g}" for p in curve)
            rows.append(f"| {name} ({rates}) | {'--confirm' if confirm else 'criterion'} | {m['right']:.0%} | {m['wrong']:.0%} | "
                        f"{m['median']:g} | {m['p90']} | {m['batches']:g} | {m['fixed']} (--runs {m['fixed_n']}) | {m['fixed_right']:.0%} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
