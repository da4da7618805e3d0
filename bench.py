"""Benchmarks, measured side by side in one run (not a test): `python bench.py`.

Prints the sandbox's call and start-up costs, the harness's overhead per step and its
wall time under simulated API latency, and the grading time per submission.
"""
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import main
from conversions import convert
from grader import grade
from scripted_api import ScriptedClient, reply, text, tool_use
from task import make_instance
from tools import Sandbox, bwrap_usable


def median_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
    opts = main.parse_args(["--level", "1", "--out", str(tmp), "--concurrency", str(concurrency),
                            "--max-steps", str(steps)])
    clients = [ScriptedClient(list(script), latency=latency) for _ in range(runs)]
    sweep = main.Sweep(opts, runs, "bench")
    start = time.perf_counter()
    asyncio.run(main.run_all([main.Run(i, i, 1) for i in range(runs)], clients, opts, isolated, sweep))
    elapsed = time.perf_counter() - start
    done = sweep.done
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
    print("== grading ==")
    for level in (1, 5, 6):
        inst = make_instance(level, 0)
        for mistake in (None, "rope_permutation" if level > 1 else "qkv_split"):
            path = tmp / f"sub-{level}-{mistake}.npz"
            np.savez(path, **convert(inst.files, inst.args, inst.config, mistake))
            seconds = median_seconds(lambda p=path, lv=level: grade(p, lv, 0), 5)
            print(f"level {level}, {mistake or 'reference'} submission: {seconds * 1e3:8.1f} ms")


if __name__ == "__main__":
    isolated = bwrap_usable()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "ws").mkdir()
        bench_sandbox(tmp / "ws", isolated)
        bench_harness(tmp, isolated)
        bench_grading(tmp)
