"""The child process grading runs in: a bound it hits is a failing Grade that names it, never an error."""
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import bz2_bomb

import bounded
from bounded import MEMORY_BYTES, run_child

ROOT = Path(__file__).resolve().parents[1]


def child(body: str) -> list[str]:
    """A child like grader.py's --child mode, serving the function with this body instead of grade_in_process."""
    code = (f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport os, resource, time, zipfile\n"
            f"from bounded import Grade, serve_child\n\ndef work():\n{textwrap.indent(body, '    ')}\n\n"
            "serve_child(work)\n")
    return [sys.executable, "-c", code]


def test_the_childs_grade_comes_back_whole():
    g = run_child(child("return Grade(False, 'other', float('nan'), 'détail')"))
    assert (g.passed, g.label, g.detail) == (False, "other", "détail") and g.max_error != g.max_error  # NaN


def test_a_memory_bound_hit_in_the_grading_child_is_labelled_too_large(tmp_path):
    """The bz2 bomb read as if the grader's method check were missing, as a decompressor bug we have not found
    would be: zipfile inflates the member whole, 3 GiB, and the child's bound stops it at 2 GiB. With the bound
    removed by hand (RLIMIT_AS in bounded.serve_child), this test fails: the child inflates all of it (taking
    ~50 s and 3 GiB or more), then zipfile's CRC check raises on the 1000 bytes it keeps."""
    path = tmp_path / "bomb.npz"
    path.write_bytes(bz2_bomb())
    started = time.monotonic()
    g = run_child(child(f"data = zipfile.ZipFile({str(path)!r}).read('model.embed_tokens.weight.npy')\n"
                        "return Grade(True, str(len(data)))"))
    assert (g.passed, g.label, g.max_error) == (False, "too_large", None), g
    assert f"more than {MEMORY_BYTES >> 30} GiB of memory" in g.detail and time.monotonic() - started < 60


@pytest.mark.parametrize("body, label, detail", [
    # The CPU bound, lowered to 1 s here so as not to wait CPU_SECONDS.
    ("resource.setrlimit(resource.RLIMIT_CPU, (1, resource.getrlimit(resource.RLIMIT_CPU)[1]))\nwhile True: pass",
     "unreadable", "s of CPU time"),
    ("os.abort()", "unreadable", "crashed on it (SIGABRT)"),
])
def test_a_child_that_runs_too_long_or_crashes_is_a_labelled_failure(body, label, detail):
    g = run_child(child(body))
    assert (g.passed, g.label, g.max_error) == (False, label, None) and detail in g.detail, g


def test_a_child_that_waits_is_stopped_at_the_wall_clock_bound(monkeypatch):
    monkeypatch.setattr(bounded, "WAIT_SECONDS", 1)
    g = run_child(child("time.sleep(60)"))
    assert (g.passed, g.label) == (False, "unreadable") and "more than 1 s" in g.detail


@pytest.mark.parametrize("body, message", [("raise ValueError('a grader bug')", "ValueError: a grader bug"),
                                           ("os.kill(os.getpid(), 9)", "status -9")])
def test_a_grader_bug_or_a_kill_from_outside_is_the_callers_error_not_a_grade(body, message):
    with pytest.raises(RuntimeError, match=message):
        run_child(child(body))
