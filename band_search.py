"""Finding the band: which level to run next, until one passes 10-40% of the time.

The policy is a pure function of the runs so far (each one's level, seed and outcome): `next_step`
returns either a Batch of fresh (level, seed) pairs to run next, or the Verdict. It starts at the
default level, moves up (harder) from a level that passes above the band and down from one below
it, two rungs at a time from a level that passed or failed every run, and spends the rest on the
levels that lie in the band or straddle it. It expects the pass rate to fall as the level rises
but acts only on what each level's runs say, so noise or a bump in the curve cannot make it loop:
the run limit ends every search.
"""
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import task
from report import TARGET_BAND, wilson_interval

Run = Any  # anything with level, seed and outcome, such as a main.Run
PROBE = 5  # the runs a level gets when first visited: 0/5 or 5/5 already places it well off the band
CRITERION = 10  # the task's criterion: at least this many graded runs, passing in the band
BATCH = 10  # the most runs at one level before the search looks again
MAX_RUNS = 300  # about --levels 1-11 --runs 28, the smallest fixed sweep that can confirm a level (6 passes of 28)
FIRST, LAST = min(task.LEVELS), max(task.LEVELS)
# How much a level's runs must say before the search stops on it: `criterion` is the task's own
# (CRITERION graded runs); `interval` (--confirm) also asks that its 95% interval lie on the side
# of the band's edges its rate is on; `rate` (any graded run) is only read when the run limit came first.
RATE, CRITERION_MET, INTERVAL = "rate", "criterion", "interval"
Z = 1.96  # of the 95% interval, as report.wilson_interval has it


def side(rate: float) -> int:
    """+1 for a pass rate above the band (the level is too easy), -1 below it (too hard), 0 in it."""
    low, high = TARGET_BAND
    return 1 if rate > high else -1 if rate < low else 0


@dataclass(frozen=True)
class Tally:
    graded: int
    passes: int

    @property
    def rate(self) -> float:
        return self.passes / self.graded

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.passes, self.graded)

    @property
    def side(self) -> int:
        return side(self.rate)


@dataclass(frozen=True)
class Batch:
    level: int
    seeds: tuple[int, ...]  # none of them run before at this level

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return [(self.level, seed) for seed in self.seeds]


@dataclass(frozen=True)
class Verdict:
    kind: str  # "in_band", "between" (no level is: the pair straddles it), "above", "below" (every level), "open"
    levels: tuple[int, ...]  # the level found; the straddling pair; the hardest or easiest level; none
    evidence: str  # INTERVAL, CRITERION_MET or RATE: how much the runs at those levels say
    text: str  # one line for the console, with each named level's rate and interval


def tallies(runs: Sequence[Run]) -> dict[int, Tally]:
    """Graded runs and passes per level with at least one graded run (errors and stopped runs are
    not attempts at the task); a (level, seed) recorded twice counts by its latest record."""
    latest = {(r.level, r.seed): r.outcome for r in runs}
    counts: dict[int, list[int]] = {}
    for (level, _), outcome in latest.items():
        if outcome in ("pass", "fail"):
            graded, passes = counts.setdefault(level, [0, 0])
            counts[level] = [graded + 1, passes + (outcome == "pass")]
    return {level: Tally(*c) for level, c in sorted(counts.items())}


def settled(t: Tally, evidence: str) -> bool:
    """Whether a level's runs say enough to stop on it; with INTERVAL, its 95% interval lies inside
    the band if its rate does, else wholly above or below the band."""
    if evidence == RATE:
        return True
    if t.graded < CRITERION:
        return False
    low, high = t.interval
    return evidence == CRITERION_MET or {0: TARGET_BAND[0] <= low and high <= TARGET_BAND[1],
                                         1: low > TARGET_BAND[1], -1: high < TARGET_BAND[0]}[t.side]


def runs_needed(rate: float) -> float:
    """The graded runs at which a 95% interval around this pass rate clears the band's edges on either
    side of it (so it lies inside the band, or wholly above or below it); inf on an edge.
    An interval excludes an edge e once n (rate - e)^2 >= Z^2 e (1 - e): report.wilson_interval inverted."""
    low, high = TARGET_BAND
    edges = {1: [high], -1: [low], 0: [low, high]}[side(rate)]
    return max(Z * Z * e * (1 - e) / (rate - e) ** 2 if rate != e else math.inf for e in edges)


def to_settle(t: Tally, evidence: str) -> float:
    """How many more runs a level needs, if its rate holds, to be settled at this evidence."""
    target = {RATE: 0, CRITERION_MET: CRITERION, INTERVAL: max(CRITERION, runs_needed(t.rate))}[evidence]
    return max(0, target - t.graded)


def verdict(counts: dict[int, Tally], evidence: str) -> Verdict | None:
    """The answer the levels settled at this evidence give, or None: a level in the band (the most
    run), else an adjacent pair straddling it, else every level above or below it."""
    done = {lv: t for lv, t in counts.items() if settled(t, evidence)}
    inside = sorted((lv for lv, t in done.items() if t.side == 0), key=lambda lv: -done[lv].graded)
    if inside:
        whole = " with its whole interval" if evidence == INTERVAL else ""
        return Verdict("in_band", (inside[0],), evidence, f"level {describe(inside[0], done)}, in the band{whole}")
    for a, b in itertools.pairwise(range(FIRST, LAST + 1)):
        if a in done and b in done and done[a].side == 1 and done[b].side == -1:
            return Verdict("between", (a, b), evidence, f"no level passes in the band; it falls between level "
                           f"{describe(a, done)} and level {describe(b, done)}")
    sides = {t.side for t in done.values()}
    if sides == {1} and LAST in done:
        return Verdict("above", (LAST,), evidence, f"every level passes above the band, even the hardest, level "
                       f"{describe(LAST, done)}")
    if sides == {-1} and FIRST in done:
        return Verdict("below", (FIRST,), evidence, f"every level passes below the band, even the easiest, level "
                       f"{describe(FIRST, done)}")
    return None


def describe(level: int, counts: dict[int, Tally]) -> str:
    t = counts[level]
    low, high = t.interval
    return f"{level}: {t.passes}/{t.graded} passed ({t.rate:.0%}, 95% interval {low:.0%}-{high:.0%})"


def next_step(runs: Sequence[Run], confirm: bool = False, max_runs: int = MAX_RUNS, base_seed: int = 0
              ) -> Batch | Verdict:
    """What to do after `runs` (every run so far, errors and stopped runs included): the next Batch,
    or the Verdict once a level meets the criterion (with confirm, its interval lies inside the
    band), or no level can, or `max_runs` runs have been made (then the best reading so far)."""
    counts = tallies(runs)
    wanted = INTERVAL if confirm else CRITERION_MET
    found = verdict(counts, wanted)
    if found:
        return found
    if len(runs) >= max_runs:
        return limit_reading(counts, wanted, "the run limit came first")
    errors = sum(r.outcome == "error" for r in runs)
    if errors >= PROBE and errors > len(runs) / 2:  # no plan ends a search, so these must
        return Verdict("open", (), RATE, f"stopped: {errors} of {len(runs)} runs ended in an error, too many to go on")
    level = where_next(counts, wanted)
    size = PROBE if level not in counts else max(1, math.ceil(min(to_settle(counts[level], wanted), BATCH)))
    used = {r.seed for r in runs if r.level == level}
    seeds = itertools.islice((s for s in itertools.count(base_seed) if s not in used), min(size, max_runs - len(runs)))
    return Batch(level, tuple(seeds))


def limit_reading(counts: dict[int, Tally], wanted: str, why: str) -> Verdict:
    """Something (`why`) ended the search first: the verdict of the strongest evidence short of `wanted` that gives one."""
    for evidence in (CRITERION_MET, RATE) if wanted == INTERVAL else (RATE,):
        reading = verdict(counts, evidence)
        if reading:
            return replace(reading, text=f"{why}; so far: {reading.text}")
    return Verdict("open", (), RATE, f"{why}, before any graded run")


def stopped_reading(runs: Sequence[Run], confirm: bool, why: str) -> Verdict:
    """The verdict of a search that the cap, a fatal API error or Ctrl-C stopped (`why`) before it ended:
    what next_step would have said if the runs so far already settle it, else the best reading so far."""
    counts, wanted = tallies(runs), INTERVAL if confirm else CRITERION_MET
    return verdict(counts, wanted) or limit_reading(counts, wanted, why)


def where_next(counts: dict[int, Tally], wanted: str) -> int:
    """The level to run next. No graded run yet: the task's default level. Else the level passing in
    the band that is nearest to settled (with INTERVAL, once it has CRITERION runs, its neighbour on
    the side of the band's middle gets as many first); else the less settled level of an adjacent
    pair straddling the band; else the middle of a gap between a level above the band and the next
    one visited, below it; else onwards from the hardest level visited if it is above the band, or
    from the easiest if it is below: two rungs from a level that passed (failed) every run, else one."""
    if not counts:
        return task.DEFAULT_LEVEL
    inside = [lv for lv, t in counts.items() if t.side == 0]
    if inside:
        best = min(inside, key=lambda lv: to_settle(counts[lv], wanted))
        toward_middle = best + (1 if counts[best].rate > sum(TARGET_BAND) / 2 else -1)
        if wanted == INTERVAL and counts[best].graded >= CRITERION and toward_middle in task.LEVELS \
                and (toward_middle not in counts or counts[toward_middle].graded < CRITERION):
            return toward_middle  # it may pass nearer the middle, where an interval fits inside the band sooner
        return best
    visited = sorted(counts)
    for a, b in itertools.pairwise(visited):
        if counts[a].side == 1 and counts[b].side == -1:
            if b == a + 1:
                return min((lv for lv in (a, b) if not settled(counts[lv], wanted)),
                           key=lambda lv: to_settle(counts[lv], wanted))
            return (a + b) // 2
    hardest, easiest = counts[visited[-1]], counts[visited[0]]
    if hardest.side == 1:
        return min(visited[-1] + (2 if hardest.passes == hardest.graded else 1), LAST)
    return max(visited[0] - (2 if easiest.passes == 0 else 1), FIRST)


def summary(runs: Sequence[Run], found: Verdict) -> dict:
    """summary.json's band_search: the path, a step per stretch of consecutive runs at one level with
    that level's count after it; the runs made; the level found (by the criterion or the interval),
    else None; and the verdict."""
    path = []
    for end, run in enumerate(runs, 1):
        if end < len(runs) and runs[end].level == run.level:
            continue  # the stretch at this level goes on
        t = tallies(runs[:end]).get(run.level, Tally(0, 0))
        path.append({"level": run.level, "runs": sum(r.level == run.level for r in runs[:end]), "graded": t.graded,
                     "passes": t.passes, "wilson_95": list(wilson_interval(t.passes, t.graded))})
    level = found.levels[0] if found.kind == "in_band" and found.evidence != RATE else None
    return {"path": path, "runs": len(runs), "level": level, "verdict": found.kind, "levels": list(found.levels),
            "evidence": found.evidence, "text": found.text}
