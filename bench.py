"""Benchmarks, measured side by side in one run (not a test): `python bench.py`.

Prints the sandbox's call and start-up costs, the harness's overhead per step and its
wall time under simulated API latency, and the grading time per submission, in process
and in grade()'s bounded child.
"""
import argparse
import asyncio
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import conversions
import main
from conversions import convert
from grader import grade, grade_in_process
from scripted_api import ScriptedClient, reply, text, tool_use
from task import CALL_TIMEOUT_S, LEVELS, make_instance, write_workspace
from tools import Sandbox, bwrap_usable


def median_seconds(fn, repeat: int) -> float:
    return median_wall_and_cpu(fn, repeat)[0]


def median_wall_and_cpu(fn, repeat: int) -> tuple[float, float]:
    """Median wall and CPU seconds of fn(). CPU time counts every thread of this process and the children it
    waited for: unlike wall time, it hardly moves when other work shares the machine."""
    def cpu() -> float:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + children.ru_utime + children.ru_stime
    runs = []
    for _ in range(repeat):
        wall, cpu_start = time.perf_counter(), cpu()
        fn()
        runs.append((time.perf_counter() - wall, cpu() - cpu_start))
    return statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)


def bench_sandbox(tmp: Path, isolated: bool) -> None:
    print("== sandbox ==")

    async def start_and_call(isolate: bool) -> None:
        box = Sandbox(tmp, isolate=isolate)
        await box.run("pass")
        await box.close()

    async def warm_calls(n: int) -> list[float]:
        box = Sandbox(tmp, isolate=isolated)
        await box.run("pass")
        times = []
        for _ in range(n):
            start = time.perf_counter()
            await box.run("print(1)")
            times.append(time.perf_counter() - start)
        await box.close()
        return times

    warm = statistics.median(asyncio.run(warm_calls(300)))
    fresh = median_seconds(lambda: subprocess.run([sys.executable, "-c", "print(1)"], capture_output=True,
                                                  check=True), 15)
    plain = median_seconds(lambda: asyncio.run(start_and_call(False)), 15)
    print(f"warm call print(1) ({'bwrap' if isolated else 'plain'}):  {warm * 1e3:8.2f} ms")
    print(f"fresh `python -c print(1)` process:     {fresh * 1e3:8.2f} ms  ({fresh / warm:.0f}x the warm call)")
    print(f"worker start + first call, plain:       {plain * 1e3:8.2f} ms")
    if isolated:
        wrapped = median_seconds(lambda: asyncio.run(start_and_call(True)), 15)
        print(f"worker start + first call, bwrap:       {wrapped * 1e3:8.2f} ms  ({wrapped / plain:.2f}x plain)")


def timed_batch(tmp: Path, runs: int, steps: int, latency: float, concurrency: int, isolated: bool) -> float:
    script = [reply(tool_use("python", {"code": "pass"})) for _ in range(steps - 1)]
    script.append(reply(text("done"), stop_reason="end_turn"))
    opts = main.parse_args(["--level", "1", "--runs", str(runs), "--out", str(tmp), "--concurrency", str(concurrency),
                            "--max-steps", str(steps)])
    start = time.perf_counter()
    done = main.run_sweep(opts, isolated, "bench", lambda run: ScriptedClient(list(script), latency=latency)).runs
    elapsed = time.perf_counter() - start
    assert len(done) == runs and all(r.label == "no_submission" for r in done), "a benchmark run went wrong"
    return elapsed


def bench_harness(tmp: Path, isolated: bool) -> None:
    print("== harness (scripted API; every step is one python tool call) ==")
    runs, steps = 10, 10
    with open("/dev/null", "w") as quiet:
        stdout, sys.stdout = sys.stdout, quiet
        try:
            zero = timed_batch(tmp / "zero", runs, steps, 0.0, 1, isolated)
            latent = {c: timed_batch(tmp / f"c{c}", 50, 10, 0.1, c, isolated) for c in (10, 50)}
        finally:
            sys.stdout = stdout
    print(f"overhead per step, zero API latency:    {zero / (runs * steps) * 1e3:8.2f} ms "
          f"(incl. workspace, sandbox start and transcript per run)")
    for c, elapsed in latent.items():
        ideal = -(-50 // c) * 10 * 0.1
        print(f"50 runs x 10 steps, 100 ms latency, concurrency {c:>2}: {elapsed:6.2f} s, "
              f"ideal {ideal:.1f} s, ratio {elapsed / ideal:.2f}")


def bench_grading(tmp: Path) -> None:
    """grade(), which grades in a bounded child process, beside grade_in_process in this one (as main.py,
    the Inspect scorer and the Harbor verifier graded before)."""
    print("== grading, wall (CPU) ms: in this process, and in grade()'s bounded child process ==")
    slowest = 0.0
    for level in sorted(LEVELS):
        inst = make_instance(level, 0)
        for mistake in (None, "rope_layout" if level > 1 else "qkv_split"):
            path = tmp / f"sub-{level}-{mistake}.npz"
            np.savez(path, **convert(inst.files, inst.args, inst.config, mistake, inst.optimizer))
            (here, here_cpu), (child, child_cpu) = (median_wall_and_cpu(lambda f=f, p=path, lv=level: f(p, lv, 0), 9)
                                                    for f in (grade_in_process, grade))
            slowest = max(slowest, child)
            print(f"level {level:>2}, {mistake or 'reference':<16} in process {here * 1e3:6.1f} "
                  f"({here_cpu * 1e3:6.1f}), child {child * 1e3:6.1f} ({child_cpu * 1e3:6.1f}): "
                  f"{child / here:4.2f}x wall, {(child_cpu - here_cpu) * 1e3:+6.1f} ms CPU")
    print(f"slowest grade(): {slowest * 1e3:.0f} ms")


def bench_solution_in_sandbox(tmp: Path, isolated: bool) -> None:
    """A reference-style level-8 solution, timed inside the sandbox against its 60 s call limit."""
    print("== a level-8 solution in the sandbox ==")
    ws = tmp / "solution"
    write_workspace(ws, make_instance(8, 0))
    convert = Path(conversions.__file__).read_text() + "\nconvert_workspace('converted.npz')"
    forward = ("import json, time, numpy as np, target_model as t\nstart = time.perf_counter()\n"
               "m = t.load_checkpoint('converted.npz')\nref = np.load('reference.npz')\n"
               "err = max(np.abs(t.forward(m, x) - y).max() for x, y in zip(ref['tokens'], ref['logits']))\n"
               "print(f'{time.perf_counter() - start:.3f} {len(ref[\"tokens\"])} {err:.2g}')")

    async def go() -> list[tuple[float, str]]:
        box = Sandbox(ws, isolate=isolated)
        out = []
        try:
            for code in (convert, forward):
                start = time.perf_counter()
                result = await box.run(code)
                out.append((time.perf_counter() - start, result.output))
        finally:
            await box.close()
        return out
    (convert_s, _), (_, forward_out) = asyncio.run(go())
    seconds, rows, err = forward_out.split()
    print(f"reference conversion from the optimizer state: {convert_s:6.2f} s (call limit {CALL_TIMEOUT_S} s)")
    print(f"runtime forward over all {rows} rows of reference.npz: {float(seconds):6.2f} s, max error {err}")


def run_benchmarks() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    isolated = bwrap_usable()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "ws").mkdir()
        bench_sandbox(tmp / "ws", isolated)
        bench_harness(tmp, isolated)
        bench_grading(tmp)
        bench_solution_in_sandbox(tmp, isolated)


if __name__ == "__main__":
    run_benchmarks()
