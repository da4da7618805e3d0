"""What a sweep runs next: a fixed sweep's plan (--levels x --runs), or the band search's batches
(band_search.py decides them); what each keeps of its records on --resume; and offline, the scripted
replies each run gets."""
import argparse

import band_search
from records import Run, latest


class FixedSweep:
    """Every run planned at once, levels interleaved so that an early stop covers each. Offline, a level's
    runs are its scripted conversions of the instance at --seed; online, --runs seeds of it."""

    def __init__(self, opts: argparse.Namespace):
        if opts.offline:
            from scripted_api import offline_scripts
            per_level = {lv: offline_scripts(lv, opts.seed) for lv in opts.levels}
        else:
            per_level = {lv: [("model", None)] * opts.runs for lv in opts.levels}
        self.runs: list[Run] = []
        self.scripts: dict[int, tuple[str, list | None]] = {}  # by run_id: (name, replies) of an offline run
        for i in range(max(len(v) for v in per_level.values())):
            for lv in opts.levels:
                if i < len(per_level[lv]):
                    self.scripts[len(self.runs)] = per_level[lv][i]
                    self.runs.append(Run(len(self.runs), opts.seed + i * (not opts.offline), lv))

    def next_runs(self, done: list[Run]) -> list[Run]:
        """The planned runs not done yet: all of them at first, none once they have run. The plan is
        the same on resuming, so its numbers name the same runs."""
        ended = {r.run_id for r in done}
        return [run for run in self.runs if run.run_id not in ended]

    @staticmethod
    def keep(records: list[Run]) -> list[Run]:
        """What a --resume keeps: the latest record of each run that passed or failed; the rest start over."""
        return [r for r in latest(records) if r.outcome in ("pass", "fail")]

    def script(self, run: Run) -> tuple[str, list]:
        return self.scripts[run.run_id]


class BandSearch:
    """band_search.next_step's batches, run by run, each a fresh (level, seed); `verdict` once it gives one."""

    def __init__(self, opts: argparse.Namespace):
        self.confirm, self.seed = opts.confirm, opts.seed
        self.verdict: band_search.Verdict | None = None

    def next_runs(self, done: list[Run]) -> list[Run]:
        step = band_search.next_step(done, self.confirm, band_search.MAX_RUNS, self.seed)
        if isinstance(step, band_search.Verdict):
            self.verdict = step
            return []
        first = max((r.run_id for r in done), default=-1) + 1
        return [Run(first + i, seed, level) for i, (level, seed) in enumerate(step.pairs)]

    @staticmethod
    def keep(records: list[Run]) -> list[Run]:
        """What a --resume keeps: every run recorded, whatever its outcome. None is run again: the
        search goes on with fresh seeds, and a run the cap stopped is not an attempt at the task."""
        return latest(records)

    @staticmethod
    def script(run: Run) -> tuple[str, list]:
        from scripted_api import scripted_attempt
        return scripted_attempt(run.level, run.seed)


def policy_for(opts: argparse.Namespace) -> FixedSweep | BandSearch:
    return BandSearch(opts) if opts.find_band else FixedSweep(opts)
