"""The sandbox, run for real: bubblewrap where it is usable, plain processes otherwise."""
import asyncio
import os
import socket
import tempfile
import time
from pathlib import Path

import pytest

from tools import OUTPUT_LIMIT, Sandbox, SubmitError, bwrap_usable, copy_submission, resolve_submission

ROOT = Path(__file__).resolve().parents[1]
ISOLATED = bwrap_usable()
needs_bwrap = pytest.mark.skipif(not ISOLATED, reason="bwrap cannot create namespaces here")


def run(sandbox: Sandbox, *codes: str) -> list:
    async def go():
        try:
            return [await sandbox.run(code) for code in codes]
        finally:
            await sandbox.close()
    return asyncio.run(go())


@pytest.fixture(params=[pytest.param(True, marks=needs_bwrap), False], ids=["bwrap", "plain"])
def sandbox(request, tmp_path):
    (tmp_path / "ws").mkdir()
    return Sandbox(tmp_path / "ws", isolate=request.param, timeout=3)


def test_state_persists_and_output_is_captured_in_order(sandbox):
    first, second = run(sandbox, "import sys\nx = 41\nprint('out')\nprint('err', file=sys.stderr)",
                        "x += 1\nprint(x)\nopen('f.txt', 'w').write('kept')")
    assert (first.output, first.is_error) == ("out\nerr\n", False)
    assert second.output == "42\n"
    assert (sandbox.workspace / "f.txt").read_text() == "kept"


def test_workspace_modules_and_numpy_import(sandbox):
    (sandbox.workspace / "helper.py").write_text("VALUE = 7\n")
    (r,) = run(sandbox, "import helper, numpy\nprint(helper.VALUE * numpy.ones(2).sum())")
    assert (r.output, r.is_error) == ("14.0\n", False)


def test_exception_returns_traceback(sandbox):
    (r,) = run(sandbox, "def f():\n    return 1 / 0\nprint('before')\nf()")
    assert r.is_error and r.output.startswith("before\nTraceback") and "ZeroDivisionError" in r.output
    assert 'File "<string>"' not in r.output  # the worker's own frame is not shown


def test_timeout_restarts_worker_and_next_call_works(sandbox):
    start = time.monotonic()
    r1, r2, r3 = run(sandbox, "x = 1\nwhile True: pass", "print(x)", "print('alive')")
    assert time.monotonic() - start < 15
    assert r1.is_error and "Timed out after 3 s" in r1.output and "Variables" in r1.output
    assert r2.is_error and "NameError" in r2.output
    assert (r3.output, r3.is_error) == ("alive\n", False)


def test_huge_allocation_fails_cleanly(sandbox):
    r1, r2 = run(sandbox, "import numpy as np\na = np.ones(10 * 2**30 // 8)", "print('alive')")
    assert r1.is_error and "MemoryError" in r1.output
    assert r2.output == "alive\n"


def test_huge_print_is_cut_in_the_middle(sandbox):
    (r,) = run(sandbox, "print('a' * 30_000 + 'b' * 30_000)\nprint('end')")
    assert len(r.output) < OUTPUT_LIMIT + 200
    assert r.output.startswith("aaa") and r.output.endswith("b\nend\n")
    assert "50005 bytes of output left out" in r.output


def test_exits_end_only_the_worker(sandbox):
    r1, r2, r3, r4 = run(sandbox, "import sys\nx = 1\nsys.exit(3)", "print(x)", "import os\nos._exit(4)",
                         "print('alive')")
    assert r1.is_error and "SystemExit(3)" in r1.output
    assert r2.output == "1\n"
    assert r3.is_error and "exit status 4" in r3.output and "restarted" in r3.output
    assert r4.output == "alive\n"


def test_no_secret_in_environment(sandbox, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-secret")
    (r,) = run(sandbox, "import os\nprint(sorted(os.environ))\nprint('sk-secret' in str(os.environ))")
    assert "ANTHROPIC_API_KEY" not in r.output and r.output.endswith("False\n")


@needs_bwrap
def test_isolation(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "secret.txt").write_text("other run")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    (tmp_path / "ws").mkdir()
    sb = Sandbox(tmp_path / "ws", isolate=True, timeout=10)
    probes = {
        "project": f"open({str(ROOT / 'grader.py')!r}).read()",
        "other run": f"open({str(other / 'secret.txt')!r}).read()",
        "network": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
        "system write": "open('/usr/lib/x', 'w')",
        "write outside": f"open({str(tmp_path / 'escape.txt')!r}, 'w')",
    }
    results = run(sb, *probes.values(), "print(open('own.txt', 'w').write('ok'))")
    listener.close()
    for name, r in zip(probes, results[:-1], strict=True):
        assert r.is_error and "Error" in r.output, name
    assert results[-1].output == "2\n" and (tmp_path / "ws" / "own.txt").exists()
    assert not (tmp_path / "escape.txt").exists()


@needs_bwrap
def test_fork_bomb_is_contained_and_cleaned_up(tmp_path):
    (tmp_path / "ws").mkdir()
    (tmp_path / "neighbour").mkdir()
    sb = Sandbox(tmp_path / "ws", isolate=True, timeout=5)
    neighbour = Sandbox(tmp_path / "neighbour", isolate=True, timeout=20)
    bomb = "import os\nwhile True:\n    os.fork()"
    count = "import time\ntotal = 0\nfor i in range(20):\n    time.sleep(0.1)\n    total += i\nprint(total)"

    async def side_by_side():
        try:
            return await asyncio.gather(asyncio.to_thread(run, sb, bomb, "print('alive')"), neighbour.run(count))
        finally:
            await neighbour.close()

    (r1, r2), other = asyncio.run(side_by_side())
    assert r1.is_error and ("BlockingIOError" in r1.output or "Timed out" in r1.output)
    assert r2.output == "alive\n"
    assert (other.output, other.is_error) == ("190\n", False)  # the other run was unharmed
    if sb.uid >= 0:  # every process of the worker's uid is gone once the sandbox is closed
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(
                p.stat().st_uid == sb.uid for p in Path("/proc").iterdir() if p.name.isdigit() and p.exists()):
            time.sleep(0.1)
        assert not any(p.stat().st_uid == sb.uid for p in Path("/proc").iterdir() if p.name.isdigit() and p.exists())


def test_calls_in_different_sandboxes_run_in_parallel(tmp_path):
    boxes = []
    for i in range(4):
        (tmp_path / str(i)).mkdir()
        boxes.append(Sandbox(tmp_path / str(i), isolate=ISOLATED, timeout=10))

    async def go():
        await asyncio.gather(*(b.run("pass") for b in boxes))  # start-up is not what is measured
        start = time.monotonic()
        results = await asyncio.gather(*(b.run("import time\ntime.sleep(1)\nprint('done')") for b in boxes))
        elapsed = time.monotonic() - start
        await asyncio.gather(*(b.close() for b in boxes))
        return results, elapsed

    results, elapsed = asyncio.run(go())
    assert all(r.output == "done\n" for r in results)
    assert elapsed < 2.5


def test_submit_path_must_stay_in_workspace(tmp_path):
    ws = tmp_path / "ws"
    (ws / "sub").mkdir(parents=True)
    (ws / "sub" / "ok.npz").write_bytes(b"x")
    (tmp_path / "outside.npz").write_bytes(b"x")
    (ws / "link.npz").symlink_to(tmp_path / "outside.npz")
    (ws / "inner_link.npz").symlink_to(ws / "sub" / "ok.npz")
    assert resolve_submission(ws, "sub/ok.npz") == (ws / "sub" / "ok.npz").resolve()
    assert resolve_submission(ws, "inner_link.npz") == (ws / "sub" / "ok.npz").resolve()
    for bad, why in [("../outside.npz", "outside"), ("link.npz", "outside"), (str(ws / "sub/ok.npz"), "absolute"),
                     ("missing.npz", "not a file"), ("sub", "not a file"), ("", "non-empty"), (5, "non-empty")]:
        with pytest.raises(SubmitError, match=why):
            resolve_submission(ws, bad)


@needs_bwrap
def test_worker_start_failure_is_reported(tmp_path):
    (tmp_path / "ws").mkdir()
    sb = Sandbox(tmp_path / "ws", isolate=True, timeout=5)
    (tmp_path / "ws").rmdir()
    (r,) = run(sb, "print(1)")
    assert r.is_error and "ended during this call" in r.output and "bwrap" in r.output


def test_submit_follows_links_as_the_sandbox_sees_them(tmp_path):
    ws = tmp_path / "ws"
    (ws / "sub").mkdir(parents=True)
    (ws / "out.npz").write_bytes(b"x")
    (ws / "sandbox_link.npz").symlink_to("/workspace/out.npz")
    (ws / "dir_link").symlink_to("/workspace/sub")
    (ws / "sub" / "up.npz").symlink_to("../out.npz")
    (ws / "loop_a").symlink_to("loop_b")
    (ws / "loop_b").symlink_to("loop_a")
    (ws / "escape.npz").symlink_to("/workspace/../etc/passwd")
    (ws / "host.npz").symlink_to("/etc/passwd")
    for good in ("sandbox_link.npz", "dir_link/up.npz", "sub/../out.npz", "./sandbox_link.npz"):
        assert resolve_submission(ws, good) == (ws / "out.npz").resolve(), good
    for bad, why in [("loop_a", "too many levels"), ("x" * 5000, "cannot be opened"),
                     ("a/" * 3000 + "b", "cannot be opened|not a file"), ("escape.npz", "outside"),
                     ("host.npz", "outside"), ("dir_link/../../x", "outside")]:
        with pytest.raises(SubmitError, match=why):
            resolve_submission(ws, bad)


def test_huge_astral_and_surrogate_errors_come_back_cut(sandbox):
    big, lone, after = run(sandbox, "raise ValueError('\\U0001F600' * 20000)",
                           "raise ValueError('\\udc80 \\x00' * 5000)", "print('alive')")
    assert big.is_error and "characters left out" in big.output and "\U0001F600" in big.output
    assert lone.is_error and "ValueError" in lone.output
    assert after.output == "alive\n"


@pytest.mark.parametrize("garbage", [
    "b'not json at all\\n'",
    "b'{\"output\": 1}\\n'",
    "b'x' * 400_000 + b'\\n'",
    "b'\\xff\\xfe\\n'",
])
def test_bytes_written_to_the_result_channel_restart_the_worker(sandbox, garbage):
    code = f"import os\nfor fd in range(3, 64):\n    try: os.write(fd, {garbage})\n    except OSError: pass\nx = 1"
    hijack, state = run(sandbox, code, "print(globals().get('x'))")
    assert hijack.is_error and "restarted" in hijack.output
    assert state.output == "None\n"  # a fresh process


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to become a user that is not")
def test_an_unreadable_submission_is_a_tool_error_for_a_harness_that_is_not_root():
    # A forked child turns into uid 65534 and calls the real copy_submission: the harness as a normal user.
    with tempfile.TemporaryDirectory(dir="/tmp") as shared:
        Path(shared).chmod(0o755)
        locked = Path(shared) / "locked.npz"
        locked.write_bytes(b"x")
        locked.chmod(0)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                copy_submission(locked, Path("/dev/null"), 10)
                message = "copied"
            except SubmitError as e:
                message = f"refused: {e}"
            except BaseException as e:  # noqa: BLE001 -- reported to the parent, whatever it is
                message = repr(e)
            os.write(write_end, message.encode())
            os._exit(0)
        os.close(write_end)
        os.waitpid(pid, 0)
        with os.fdopen(read_end) as f:
            message = f.read()
    assert message.startswith("refused: locked.npz cannot be read"), message


def test_the_tool_descriptions_state_the_limits_the_sandbox_enforces():
    import task
    python, submit = (t["description"] for t in task.TOOLS)
    for stated in (f"{task.CALL_TIMEOUT_S} s", f"{task.OUTPUT_LIMIT} bytes", f"{task.MEMORY_BYTES >> 30} GiB",
                   f"{task.CPU_SECONDS} s of CPU", f"{task.MAX_PROCESSES} processes", task.QUOTA_TEXT):
        assert stated in python
    assert "is not a submission" in submit and "submit again" in submit


def test_a_well_formed_line_forged_on_the_result_channel_is_caught_one_call_later(sandbox):
    """A forged result carrying the right call number is taken for that call's result; the real one then
    arrives out of turn, and the worker is restarted rather than answering every later call one behind."""
    forge = ("import __main__, json\nx = 1\n__main__.results.write(json.dumps({'output': 'forged', 'error': False, "
             "'seq': __main__.request['seq']}).encode() + b'\\n')\n__main__.results.flush()\nprint('real')")
    forged, caught, fresh, after = run(sandbox, forge, "print('second')", "print(globals().get('x'))", "print(3)")
    assert forged.output == "forged"
    assert caught.is_error and "restarted" in caught.output
    assert fresh.output == "None\n" and after.output == "3\n"  # in step again, in a fresh process
