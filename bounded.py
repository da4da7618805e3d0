"""A Grade, and grading in a child process bounded in memory and CPU time, so that no submission can take
the memory of whoever grades it (main.py, the Inspect scorer, the Harbor verifier, `python grader.py`)
or stall it.

grader.grade runs grader.py again as that child: serve_child() bounds the child before it reads the file and
prints its Grade as JSON; run_child() reads it back, and turns a bound the child hit into a failing Grade that
names the bound. The bounds count memory and CPU time, not wall time, so a busy machine does not change
a grade: the same file always gets the same one.
"""
import json
import os
import resource
import signal
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass
class Grade:
    passed: bool
    label: str  # "pass", a convention that was got wrong, or why the file was refused
    max_error: float | None = None  # worst |logit difference|, once the file was valid
    detail: str = ""


MEMORY_BYTES = 2 * 2**30  # the child's address space; grading peaks below 0.2 GiB of it
CPU_SECONDS = 30  # grading takes under 0.5 s (bench.py)
WAIT_SECONDS = 600  # wall clock, for a child that waits instead of computing (none should)
OUT_OF_MEMORY = 3  # the child's exit status when an allocation failed under MEMORY_BYTES
CRASHES = {signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGFPE, signal.SIGILL}  # a parser bug the file found
# OpenBLAS reserves some 40 MB of address space per thread, a thread per core: on a large machine that alone
# would approach MEMORY_BYTES. The models are far too small to gain from threads.
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def run_child(command: list[str]) -> Grade:
    """Run `command`, a Python process that calls serve_child(), and return its Grade, or a failing one if it hit a
    bound. Raises RuntimeError if it failed otherwise: a grader bug, or a kill from outside."""
    try:
        child = subprocess.run(command, capture_output=True, text=True, timeout=WAIT_SECONDS, check=False,
                               env=os.environ | ONE_THREAD)
    except subprocess.TimeoutExpired:
        return Grade(False, "unreadable", None, f"grading it took more than {WAIT_SECONDS} s")
    if child.returncode == 0:
        return Grade(**json.loads(child.stdout))
    if child.returncode == OUT_OF_MEMORY:
        return Grade(False, "too_large", None, f"grading it needs more than {MEMORY_BYTES >> 30} GiB of memory")
    if child.returncode == -signal.SIGXCPU:
        return Grade(False, "unreadable", None, f"grading it takes more than {CPU_SECONDS} s of CPU time")
    if -child.returncode in CRASHES:
        crash = signal.Signals(-child.returncode).name
        return Grade(False, "unreadable", None, f"the grading process crashed on it ({crash})")
    raise RuntimeError(f"the grading process ended with status {child.returncode}: {child.stderr[-4000:]}")


def serve_child(work: Callable[[], Grade]) -> None:
    """In the child: bound this process, then print work()'s Grade as JSON, or exit OUT_OF_MEMORY."""
    for limit, value in ((resource.RLIMIT_AS, MEMORY_BYTES), (resource.RLIMIT_CPU, CPU_SECONDS),
                         (resource.RLIMIT_CORE, 0)):  # soft limits: SIGXCPU at CPU_SECONDS; no core file
        hard = resource.getrlimit(limit)[1]
        resource.setrlimit(limit, (value if hard == resource.RLIM_INFINITY else min(value, hard), hard))
    try:
        grade = work()
    except MemoryError:
        raise SystemExit(OUT_OF_MEMORY) from None
    print(json.dumps(asdict(grade)))
