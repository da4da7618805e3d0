"""Whole-worker limits, tested on the real sandbox: memory and processes (cgroup), user namespaces
(seccomp), disk (workspace quota)."""
import asyncio
import os
import time
from pathlib import Path

import pytest
from test_tools import ISOLATED, needs_bwrap, run

import tools
from limits import Cgroup, cgroups_usable, remove_stale_cgroups, workspace_bytes
from tools import MAX_PROCESSES, MEMORY_BYTES, Sandbox

needs_cgroups = pytest.mark.skipif(not cgroups_usable(), reason="cannot create v1 memory and pids cgroups here")

MEMFD_HOG = """
import os
held, fds = 0, []
chunk = b"x" * 2**24
while held < 6 * 2**30:
    fd = os.memfd_create("hog")
    for _ in range(15):  # 240 MiB per file, under the 256 MiB file-size limit
        os.write(fd, chunk)
    fds.append(fd)
    held += 15 * 2**24
    with open("held.txt", "w") as f:
        f.write(str(held))
print("held", held)
"""

FORK_HOG = """
import os, signal, time
children = []
for _ in range(12):
    pid = os.fork()
    if pid == 0:
        block = bytearray(2**30)  # 1 GiB each, under the per-process address-space limit
        for i in range(0, len(block), 4096):
            block[i] = 1
        time.sleep(10)
        os._exit(0)
    children.append(pid)
statuses = [os.waitpid(pid, 0)[1] for pid in children]
print("killed", sum(os.WIFSIGNALED(s) and os.WTERMSIG(s) == signal.SIGKILL for s in statuses))
"""


def hog_and_neighbour(tmp_path, code: str):
    (tmp_path / "hog").mkdir()
    (tmp_path / "calm").mkdir()
    hog = Sandbox(tmp_path / "hog", isolate=ISOLATED, timeout=50)
    calm = Sandbox(tmp_path / "calm", isolate=ISOLATED, timeout=50)

    async def go():
        try:
            return await asyncio.gather(hog.run(code), calm.run("import time; time.sleep(3); print('calm')"))
        finally:
            await hog.close()
            await calm.close()
    return asyncio.run(go())


@pytest.mark.soak  # long: python -m pytest -m soak (.ci/run runs it)
@needs_cgroups
def test_memfd_memory_is_bounded_for_the_whole_worker(tmp_path):
    hogged, neighbour = hog_and_neighbour(tmp_path, MEMFD_HOG)
    assert hogged.is_error and "ended during this call" in hogged.output, hogged.output
    assert int((tmp_path / "hog" / "held.txt").read_text()) <= MEMORY_BYTES
    assert neighbour.output == "calm\n"


@pytest.mark.soak  # long: python -m pytest -m soak (.ci/run runs it)
@needs_cgroups
def test_forked_allocations_are_bounded_together(tmp_path):
    hogged, neighbour = hog_and_neighbour(tmp_path, FORK_HOG)
    killed = int(hogged.output.split()[-1])  # 12 GiB asked for, at most 4 GiB held at once
    assert killed >= 12 - MEMORY_BYTES // 2**30, hogged.output
    assert neighbour.output == "calm\n"


def sleeping(marker: bytes) -> bool:
    """Whether a process runs whose command line starts with `marker`."""
    for proc in Path("/proc").iterdir():
        try:
            if (proc / "cmdline").read_bytes().startswith(marker):
                return True
        except OSError:
            pass
    return False


@needs_cgroups
@pytest.mark.parametrize("isolate", [pytest.param(True, marks=needs_bwrap), False], ids=["bwrap", "plain"])
def test_a_process_that_left_the_session_dies_with_the_worker(isolate, tmp_path):
    (tmp_path / "ws").mkdir()
    sb = Sandbox(tmp_path / "ws", isolate=isolate, timeout=5)
    marker = f"sleep\x00{300 + isolate}".encode()

    async def go():
        await sb.run(f"import subprocess\nsubprocess.Popen(['setsid', 'sleep', '{300 + isolate}'])")
        await asyncio.sleep(0.3)
        alive = sleeping(marker)
        await sb.close()
        await asyncio.sleep(0.1)
        return alive
    assert asyncio.run(go())
    assert not sleeping(marker)


@needs_bwrap
def test_no_user_namespace_inside_the_sandbox(tmp_path):
    (tmp_path / "ws").mkdir()
    sb = Sandbox(tmp_path / "ws", isolate=True, timeout=10)
    code = ("import subprocess\n"
            "r = subprocess.run(['unshare', '-Ur', 'sh', '-c', 'mount -t tmpfs none /tmp && echo mounted'],"
            " capture_output=True, text=True)\nprint(r.returncode, r.stdout, r.stderr)\n"
            "import threading; t = threading.Thread(target=print, args=('threads work',)); t.start(); t.join()")
    (r,) = run(sb, code)
    assert "mounted" not in r.output and "Operation not permitted" in r.output
    assert "threads work" in r.output


def test_workspace_bytes_counts_blocks_once(tmp_path):
    (tmp_path / "a").write_bytes(os.urandom(1 << 20))
    os.link(tmp_path / "a", tmp_path / "hard")
    (tmp_path / "d").mkdir()
    with open(tmp_path / "d" / "sparse", "wb") as f:
        f.truncate(1 << 30)
    used = workspace_bytes(tmp_path, 100)
    assert (1 << 20) <= used < (1 << 20) + (1 << 16)
    for i in range(10):
        (tmp_path / f"f{i}").touch()
    assert workspace_bytes(tmp_path, 10) == float("inf")


@pytest.mark.parametrize("isolate", [pytest.param(True, marks=needs_bwrap), False], ids=["bwrap", "plain"])
def test_filling_the_disk_is_stopped_and_reported(isolate, tmp_path, monkeypatch):
    monkeypatch.setattr(tools, "WORKSPACE_QUOTA_BYTES", 64 << 20)
    (tmp_path / "ws").mkdir()
    sb = Sandbox(tmp_path / "ws", isolate=isolate, timeout=30)
    fill = ("import os\nfor i in range(1000):\n"
            "    with open(f'fill{i}', 'wb') as f: f.write(os.urandom(1 << 20))\n")
    stopped, after, cleaned = run(sb, fill, "print('still here')",
                                  "import os, glob\nfor p in glob.glob('fill*'): os.remove(p)\nprint('ok')")
    assert stopped.is_error and "grew past" in stopped.output and "over its" in stopped.output
    assert after.is_error and "still here" in after.output and "over its" in after.output
    assert cleaned.output == "ok\n" and not cleaned.is_error
    assert workspace_bytes(tmp_path / "ws", 100) < 64 << 20


def test_writing_between_calls_is_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(tools, "WORKSPACE_QUOTA_BYTES", 64 << 20)
    (tmp_path / "ws").mkdir()
    sb = Sandbox(tmp_path / "ws", isolate=ISOLATED, timeout=30)
    background = ("import os, threading, time\ndef fill():\n    time.sleep(0.2)\n    for i in range(1000):\n"
                  "        with open(f'bg{i}', 'wb') as f: f.write(os.urandom(1 << 20))\n"
                  "threading.Thread(target=fill).start()\nprint('started')")

    async def go():
        try:
            first = await sb.run(background)
            await asyncio.sleep(3)  # the model is thinking; the thread writes
            return first, await sb.run("print('next')")
        finally:
            await sb.close()
    first, second = asyncio.run(go())
    assert first.output == "started\n"
    assert second.is_error and "grew past" in second.output
    assert "next\n" in second.output  # killed between calls, the worker is restarted and this call's code runs
    assert workspace_bytes(tmp_path / "ws", 10_000) < 512 << 20


@pytest.mark.skipif(not cgroups_usable(), reason="no cgroup here: the run report says processes are not bounded")
@pytest.mark.parametrize("isolate", [pytest.param(True, marks=needs_bwrap), False], ids=["bwrap", "plain"])
def test_the_process_limit_holds_with_and_without_bubblewrap(isolate, tmp_path):
    (tmp_path / "ws").mkdir()
    loop = ("import os, time\nn = 0\ntry:\n    while n < 500:\n        if os.fork() == 0:\n"
            "            time.sleep(20)\n            os._exit(0)\n        n += 1\nexcept OSError:\n    print(n)")
    (r,) = run(Sandbox(tmp_path / "ws", isolate=isolate, timeout=20), loop)
    assert not r.is_error and 0 < int(r.output) < MAX_PROCESSES, r.output


def test_the_run_report_says_when_processes_are_not_bounded(monkeypatch):
    monkeypatch.setattr(tools, "cgroups_usable", lambda: False)  # a host without writable cgroups
    plain = tools.sandbox_report(False)
    assert "processes NOT bounded" in plain and "systemd-run --user --scope" in plain


def test_without_cgroups_a_plain_worker_still_takes_its_escaped_processes_along(tmp_path, monkeypatch):
    """No bubblewrap, no cgroup: the reaper launcher adopts what left the session and kills it."""
    monkeypatch.setattr(tools, "cgroups_usable", lambda: False)
    (tmp_path / "ws").mkdir()
    sb = Sandbox(tmp_path / "ws", isolate=False, timeout=5)
    marker = b"sleep\x00302"

    async def go():
        (r,) = [await sb.run("import os, subprocess\nsubprocess.Popen(['setsid', 'sleep', '302'])\n"
                             "if os.fork() == 0:\n    os.setsid()\n    os.execvp('sleep', ['sleep', '302'])")]
        await asyncio.sleep(0.3)
        alive = sleeping(marker)
        await sb.close()
        await asyncio.sleep(0.2)
        return r, alive
    r, alive = asyncio.run(go())
    assert alive, r
    assert not sleeping(marker)


@needs_cgroups
def test_cgroups_left_behind_are_cleared_and_live_ones_kept():
    old, young = Cgroup(2**30, 8), Cgroup(2**30, 8)
    for directory in (old.memory, old.pids):
        os.utime(directory, (time.time() - 3600, time.time() - 3600))
    try:
        remove_stale_cgroups()
        assert not old.memory.exists() and not old.pids.exists()
        assert young.memory.exists() and young.pids.exists()
    finally:
        old.remove()
        young.remove()
