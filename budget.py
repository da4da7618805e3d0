"""The spending cap: what a sweep has spent, whether a run may start, and whether a request may be sent."""
import argparse
import asyncio

import report

# The cost the cap expects of a run before any has finished: a long run, mostly cache reads.
PRIOR_RUN_USAGE = {"input_tokens": 60_000, "output_tokens": 40_000, "cache_creation_input_tokens": 100_000,
                   "cache_read_input_tokens": 1_500_000}


class Budget:
    """The sweep's spend against --max-cost: the runs that ended (`ended`), those in flight, and the `earlier`
    records of runs a --resume starts over, whose spend still counts. Runs are admitted while the cap has room,
    and a fatal API error (a bad key, an unknown model, no answer at all) closes it at once."""

    def __init__(self, opts: argparse.Namespace, ended: list = (), earlier: list = ()):
        self.model, self.offline, self.cap = opts.model, opts.offline, opts.max_cost
        self.ended = list(ended)
        self.spent_before = sum(self.cost(r) for r in earlier)
        self.in_flight: dict = {}  # records.Run by run_id
        self.changed = asyncio.Condition()  # a run ended: the cap may now allow another
        self.skipped = 0  # runs never started: the cap or a fatal error came first
        self.fatal: str | None = None  # why the API cannot serve the sweep, once a run has met that

    def cost(self, run) -> float:
        return 0.0 if self.offline else report.estimated_cost(self.model, run.usage) or 0.0

    def run_cost(self) -> tuple[float | None, bool]:
        """What a run costs, and whether that was measured: the mean of the ended runs that sent a request, or,
        before any, a run of PRIOR_RUN_USAGE; None offline and for a model without a price."""
        if self.offline or report.price(self.model) is None:
            return None, False
        costs = [self.cost(r) for r in self.ended if r.steps]
        if costs:
            return sum(costs) / len(costs), True
        return report.estimated_cost(self.model, PRIOR_RUN_USAGE), False

    def spent(self) -> float:
        return self.spent_before + sum(self.cost(r) for r in [*self.ended, *self.in_flight.values()])

    def capped(self) -> bool:
        return not self.offline and self.cap > 0

    def may_send(self) -> bool:
        """No request is sent once the spend so far has reached the cap. So a sweep passes the cap by at
        most the requests in flight when it is reached, one per running run."""
        return self.fatal is None and (not self.capped() or self.spent() < self.cap)

    def why_stop(self) -> tuple[str, str] | None:
        """Why a run must send no further request, as (label, detail), or None."""
        if self.fatal is not None:
            return "api_fatal", self.fatal
        if not self.may_send():
            return "spending_cap", f"the sweep's spend reached --max-cost ${self.cap:.2f}"
        return None

    def room_for_one_more(self) -> bool:
        """How many runs go at once: the spend so far, what the runs in flight are still expected to
        cost, and one more run, within the cap. With none in flight one run may always start."""
        if not self.capped() or not self.in_flight:
            return self.may_send()
        mean = self.run_cost()[0] or 0.0
        expected = sum(max(0.0, mean - self.cost(r)) for r in self.in_flight.values()) + mean
        return self.spent() + expected <= self.cap

    async def admit(self, run) -> bool:
        """Let `run` start once there is room, waiting for runs in flight to end (their costs then
        replace the estimate); False, and the run is skipped, once the spend has reached the cap."""
        async with self.changed:
            while self.in_flight and not self.room_for_one_more():
                await self.changed.wait()
            if not self.room_for_one_more():
                self.skipped += 1
                return False
            self.in_flight[run.run_id] = run
            return True

    async def settle(self, run) -> None:
        """The run ended: its cost moves from in flight to ended at once, so the spend is never undercounted."""
        async with self.changed:
            self.in_flight.pop(run.run_id, None)
            self.ended.append(run)
            if run.label == "api_fatal" and self.fatal is None:
                self.fatal = run.detail
            self.changed.notify_all()

    def skipped_reason(self) -> str:
        if not self.skipped:
            return ""
        return self.fatal or f"the spend reached the cap of ${self.cap:.2f} (--max-cost)"

    def text(self) -> str:
        """The spend for the console and the page."""
        if self.offline:
            return "none (scripted)"
        if report.price(self.model) is None:
            return "unknown for this model"
        return f"${self.spent():.2f}" + (f" of the ${self.cap:.2f} cap" if self.capped() else " (no cap)")
