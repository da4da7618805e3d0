"""A sweep as it goes: each run's record, console line and page refresh as it ends, and its summary
(summary.json, report.html's numbers), the band search's outcome included."""
import argparse
import math
import sys
import time
from collections import Counter

import band_search
import records
import report
import report_html
import task
from budget import Budget
from records import Run


class Sweep:
    """One invocation's runs: those kept from before and those that ended since (`budget.ended`, in the
    order they ended), how many were handed out (`planned`), and, for a search, how it ended."""

    def __init__(self, opts: argparse.Namespace, budget: Budget, policy, isolation: str):
        self.opts, self.budget, self.policy, self.isolation = opts, budget, policy, isolation  # policy: policy.py's
        self.planned = len(budget.ended)  # grows by each batch the policy hands out
        self.verdict: band_search.Verdict | None = None  # a search's, once it ended
        self.unfinished = ""  # why a search stopped before its verdict (the cap, a fatal error, Ctrl-C)
        self.interrupted = False  # by Ctrl-C
        self.started, self.started_at = time.monotonic(), records.now()

    @property
    def runs(self) -> list[Run]:
        return self.budget.ended

    def run_ended(self, run: Run) -> None:
        """A run ended: add its line to results.jsonl, print its progress line, rewrite report.html."""
        records.append(self.opts, run)
        done = f"{len(self.runs)} done" if self.opts.find_band else f"{len(self.runs)}/{self.planned} done"
        print(f"{report.run_line(run)} | {done}; {report.tally(self.runs, self.levels())}; "
              f"spent ${self.budget.spent():.2f}", flush=True)
        try:
            report_html.write_report(self.opts.out, self.summary(), self.runs)
        except OSError as e:
            print(f"run {run.run_id:03d}: could not write the report: {e}", file=sys.stderr)

    def levels(self) -> list[int]:
        """The levels in the tables: a fixed sweep's, or those the search has visited."""
        return sorted({r.level for r in self.runs}) if self.opts.find_band else self.opts.levels

    def summary(self) -> dict:
        opts, runs, budget = self.opts, self.runs, self.budget
        overall = report.level_row(None, runs, opts.model, opts.offline)  # every level together
        rows = [report.level_row(lv, [r for r in runs if r.level == lv], opts.model, opts.offline)
                for lv in self.levels()]
        usage = sum((Counter(r.usage) for r in runs), Counter())
        rate = overall["rate"]
        search = self.search() if opts.find_band else None
        return {
            "schema": records.SCHEMA_VERSION, "task_version": records.task_version(),
            "model": records.measured_model(opts), "levels_swept": self.levels(),
            "runs_per_level": None if opts.offline or opts.find_band else opts.runs, "out": str(opts.out),
            "seed": opts.seed, "offline": opts.offline, "thinking_budget": opts.thinking, "max_tokens": opts.max_tokens,
            "max_steps": opts.max_steps, "started_at": self.started_at, "ended_at": records.now(),
            "runs_planned": self.planned, "runs_finished": len(runs), "skipped": budget.skipped,
            "skipped_reason": budget.skipped_reason(),
            "stopped": sum(r.outcome == "stopped" for r in runs), "spent_usd": round(budget.spent(), 4),
            "max_cost_usd": opts.max_cost if budget.capped() else None,
            "graded": overall["graded"], "passes": overall["passes"], "pass_rate": rate, "wilson_95": overall["wilson_95"],
            "target_band": list(report.TARGET_BAND),
            "in_target_band": None if opts.offline else rate is not None and
            report.TARGET_BAND[0] <= rate <= report.TARGET_BAND[1],
            "levels": rows, "recommendation": search["text"] + "; " + search["next"] if search else
            "offline: the replies are scripted, so no level is recommended" if opts.offline else
            report.recommend(rows, opts.runs, sorted(task.LEVELS), report.next_flags(opts), *budget.run_cost()),
            **({"band_search": search} if search else {}),
            "failures": overall["failures"],
            "errors": dict(Counter(r.label for r in runs if r.outcome == "error").most_common()),
            "tokens": {"input": usage["input_tokens"], "output": usage["output_tokens"],
                       "cache_write": usage["cache_creation_input_tokens"], "cache_read": usage["cache_read_input_tokens"]},
            "estimated_cost_usd": overall["cost_usd"], "cost_text": budget.text(),
            "wall_seconds": round(time.monotonic() - self.started, 1), "isolation": self.isolation,
        }

    def search(self) -> dict:
        """summary.json's band_search: band_search.summary (path, runs, level found or null, verdict), whether it
        confirms, whether it finished, and what to run next, as the exact command."""
        found = self.verdict or band_search.Verdict("open", (), band_search.RATE, "searching")
        finished = self.verdict is not None and not self.unfinished
        return {**band_search.summary(self.runs, found), "confirm": self.opts.confirm, "finished": finished,
                "next": self.next_command(found, finished)}

    def next_command(self, found: band_search.Verdict, finished: bool) -> str:
        """What a --resume of this search would do and cost: go on, if it stopped early (about a batch's worth of
        runs more); confirm its verdict (the runs each named level needs, at the cost per run measured so far);
        or nothing, once confirmed."""
        opts, budget = self.opts, self.budget
        resume, spent = f"python main.py --resume {opts.out}", f"spent {budget.text()}"
        if self.verdict is None:
            return "searching"
        if not finished:
            runs, what = band_search.BATCH, f"to go on for up to {band_search.BATCH} runs more"
        elif found.kind == "open" or found.evidence == band_search.INTERVAL:
            return spent
        else:
            counts = band_search.tallies(self.runs)
            runs = sum(band_search.to_settle(counts[lv], band_search.INTERVAL) for lv in found.levels)
            if math.isinf(runs):
                return (f"{spent}; confirming cannot be costed: at a pass rate on the band's edge an interval never "
                        f"clears it; to try all the same: {resume} --confirm")
            runs, what = math.ceil(runs), f"confirming would take about {math.ceil(runs)} more runs"
            resume += " --confirm"
        run_cost, measured = budget.run_cost()
        if opts.offline:
            return f"{spent}; {what}: {resume}"
        if run_cost is None:
            return f"{spent}; {what} (no price is known for the model, so no cap): {resume} --max-cost 0"
        cost = runs * run_cost
        cap = max(1, math.ceil(budget.spent() + cost * report.CAP_MARGIN))
        return (f"{spent}; {what}, about ${cost:.2f} at the {'measured' if measured else 'estimated'} "
                f"${run_cost:.2f} a run: {resume} --max-cost {cap}")
