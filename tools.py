"""The model's tools: a sandboxed, stateful Python process, and submit.

The model's code is untrusted. Each run gets one worker process, isolated with bubblewrap
(no network, read-only system, its workspace the only writable place, nothing of the
project visible), bounded by rlimits and by what limits.py adds (a cgroup, a seccomp filter,
a disk quota). Where bwrap is missing or unusable, the worker runs as a plain process with
the same limits and the caller is told so.
"""
import asyncio
import glob
import importlib.util
import json
import os
import secrets
import shutil
import signal
import site
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath

from limits import Cgroup, cgroups_usable, userns_filter, workspace_bytes
from task import (  # the limits the task states to the model, enforced here
    CALL_TIMEOUT_S,
    CPU_SECONDS,
    MAX_PROCESSES,
    MAX_SUBMISSION_BYTES,
    MAX_WORKSPACE_ENTRIES,
    MEMORY_BYTES,
    OUTPUT_LIMIT,
    QUOTA_TEXT,
    WORKSPACE_QUOTA_BYTES,
)

MAX_FILE_BYTES = 256 * 2**20
# Output and error message are each cut to OUTPUT_LIMIT; a character takes at most 6 bytes in the
# worker's JSON (a control character as \u00XX).
RESULT_LINE_LIMIT = 2 * OUTPUT_LIMIT * 6 + 2**16
QUOTA_POLL_S = 0.5
SANDBOX_WORKSPACE = "/workspace"
SANDBOX_SITE = "/sandbox-site"  # the only packages model code can import: numpy, bound here alone
PROJECT = Path(__file__).resolve().parent
# What of the host a sandbox sees, read-only: the system and this Python (a venv has two prefixes),
# minus every directory of installed packages and this project (hidden_paths).
SYSTEM_PATHS = tuple(dict.fromkeys(("/usr", "/bin", "/lib", "/lib64", "/lib32", "/sbin", "/etc/ld.so.cache",
                                    "/etc/localtime", sys.base_prefix, sys.prefix)))
# Where the harness cannot make cgroups (a normal user on cgroup v2), this bounds the whole sweep instead.
SYSTEMD_SCOPE = "systemd-run --user --scope -p MemoryMax=16G -p TasksMax=1024"
MAX_SYMLINKS = 40  # as the kernel's own limit on symlinks followed in one lookup

# Runs inside the sandbox as `python -c`. Requests and results travel as JSON lines on the
# worker's original stdin/stdout; the model's code sees /dev/null and a capture file instead.
WORKER = r"""
import json, os, resource, sys, tempfile, traceback
settings = json.loads(sys.argv[1])
uid, limit = settings["uid"], settings["output_limit"]
for name, value in settings["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
if uid >= 0:
    os.setgroups([]); os.setgid(uid); os.setuid(uid)
requests, results = os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "wb")
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
worker_pid = os.getpid()

def cut(text):
    if len(text) <= limit:
        return text
    return f"{text[:limit // 2]}\n[... {len(text) - limit // 2 * 2} characters left out ...]\n{text[-(limit // 2):]}"

namespace = {"__name__": "__main__"}
for line in requests:
    request, error = json.loads(line), ""
    code = request["code"]
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 1)
        os.dup2(capture.fileno(), 2)
        try:
            exec(compile(code, "<cell>", "exec"), namespace)
        except SystemExit as e:
            error = f"SystemExit({e.code!r}) was raised; the process keeps running.\n"
        except BaseException as e:
            error = "".join(traceback.format_exception(type(e), e, e.__traceback__.tb_next))
        if os.getpid() != worker_pid:  # a child forked by the model's code must not answer
            os._exit(0)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except OSError:
                pass
        size, half = capture.seek(0, 2), limit // 2
        capture.seek(0)
        if size <= limit:
            output = capture.read().decode(errors="replace")
        else:
            head = capture.read(half).decode(errors="replace")
            capture.seek(size - half)
            tail = capture.read().decode(errors="replace")
            output = f"{head}\n[... {size - 2 * half} bytes of output left out ...]\n{tail}"
    text = (output + cut(error)).encode(errors="replace").decode()  # lone surrogates become "?"
    result = {"output": text, "error": bool(error), "seq": request["seq"]}
    results.write(json.dumps(result, ensure_ascii=False).encode() + b"\n")
    results.flush()
"""


# Without bubblewrap's PID namespace or a cgroup, nothing else holds a worker's processes together: this
# launcher makes itself their subreaper, so that processes that left the session (setsid, double fork) are
# re-parented to it rather than to init, and on SIGTERM or the worker's end it kills them all; it exits with the
# worker's status, which the tool result reports.
REAPER = r"""
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
worker = os.fork()
if worker == 0:
    os.execv(sys.argv[1], sys.argv[1:])

def children():
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if entry.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                    found.append(int(entry))
        except (OSError, ValueError, IndexError):
            pass
    return found

def end(code):
    while pids := children():  # killing one may orphan its descendants to us: repeat until none is left
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
    os._exit(code)

signal.signal(signal.SIGTERM, lambda *_: end(128 + signal.SIGTERM))
while True:
    pid, status = os.wait()
    if pid == worker:  # its exit status is passed on, as bwrap passes on its child's (128 + N for signal N)
        code = os.waitstatus_to_exitcode(status)
        end(code if code >= 0 else 128 - code)
"""


@dataclass
class ToolResult:
    output: str
    is_error: bool = False


def bwrap_usable() -> bool:
    """bwrap exists and can create the namespaces the sandbox uses."""
    if shutil.which("bwrap") is None:
        return False
    try:
        probe = subprocess.run(bwrap_prefix(Path("/")) + ["true"], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


@cache  # the host's package directories do not change while the harness runs
def hidden_paths() -> tuple[str, ...]:
    """Where the system paths would show the harness's environment: every site- and dist-packages
    directory (its dependencies, and this project's own metadata) and the project itself."""
    found = {*site.getsitepackages(), site.getusersitepackages(), str(PROJECT)}
    for root in SYSTEM_PATHS:
        for pattern in ("lib/python3*/*-packages", "local/lib/python3*/*-packages", "python3*/*-packages"):
            found.update(glob.glob(f"{root}/{pattern}"))
    return tuple(sorted(p for p in found if os.path.isdir(p) and any(Path(p).is_relative_to(r) for r in SYSTEM_PATHS)))


@cache
def numpy_dirs() -> tuple[Path, ...]:
    """numpy's package directory, and the directory of the libraries its wheel bundles."""
    package = Path(importlib.util.find_spec("numpy").submodule_search_locations[0])
    return tuple(d for d in (package, package.with_name("numpy.libs")) if d.is_dir())


def bwrap_prefix(workspace: Path) -> list[str]:
    """The bwrap command line up to the program: system read-only without its installed packages,
    numpy in a site directory of its own, the workspace writable."""
    args = ["bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session",
            "--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(MAX_FILE_BYTES), "--tmpfs", "/tmp"]
    for path in SYSTEM_PATHS:
        for parent in reversed(Path(path).parents[:-1]):  # traversable by the worker's uid
            args += ["--perms", "0755", "--dir", str(parent)]
        args += ["--ro-bind-try", path, path]
    for path in hidden_paths():  # an empty read-only directory in its place
        args += ["--tmpfs", path, "--remount-ro", path]
    args += ["--perms", "0755", "--dir", SANDBOX_SITE]
    for directory in numpy_dirs():
        args += ["--ro-bind", str(directory), f"{SANDBOX_SITE}/{directory.name}"]
    if os.geteuid() == 0:  # the worker switches to a uid of its own, so RLIMIT_NPROC applies
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user"]
    return args + ["--bind", str(workspace), SANDBOX_WORKSPACE, "--chdir", SANDBOX_WORKSPACE]


def worker_env(isolate: bool) -> dict[str, str]:
    """Only what Python needs: nothing of the harness's environment, no API key."""
    # The worker skips `site` (-S), so PYTHONPATH alone says where numpy is.
    packages = SANDBOX_SITE if isolate else os.pathsep.join(site.getsitepackages())
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "PYTHONPATH": packages}
    # Set on some processors so that older OpenBLAS builds compute correctly.
    env |= {k: v for k, v in os.environ.items() if k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    return env


class Sandbox:
    """One run's Python worker: stateful across calls, restarted after a timeout or a crash."""

    def __init__(self, workspace: Path, *, isolate: bool, timeout: float = CALL_TIMEOUT_S):
        self.workspace = Path(workspace).resolve()
        self.isolate = isolate
        self.timeout = timeout
        self.uid = 100_000 + secrets.randbelow(2**30) if isolate and os.geteuid() == 0 else -1
        self.proc: asyncio.subprocess.Process | None = None
        self.seq = 0  # calls sent to the current worker: each result must carry its call's number
        self.cgroup: Cgroup | None = None
        self.watchdog: asyncio.Task | None = None
        self.killed_for_disk = False
        self.calls_over_quota = 0  # consecutive calls after which the workspace was over its quota
        if self.uid >= 0:
            for path in [self.workspace, *self.workspace.rglob("*")]:
                os.chown(path, self.uid, self.uid, follow_symlinks=False)

    async def _start(self) -> asyncio.subprocess.Process:
        rlimits = {"RLIMIT_AS": MEMORY_BYTES, "RLIMIT_CPU": CPU_SECONDS, "RLIMIT_FSIZE": MAX_FILE_BYTES,
                   "RLIMIT_CORE": 0} | ({"RLIMIT_NPROC": MAX_PROCESSES} if self.uid >= 0 else {})
        settings = {"uid": self.uid, "output_limit": OUTPUT_LIMIT, "rlimits": rlimits}
        cmd, cwd, pass_fds = [sys.executable, "-S", "-u", "-c", WORKER, json.dumps(settings)], self.workspace, ()
        if self.isolate:
            seccomp = userns_filter()
            if seccomp is not None:  # bwrap reads the program from a pipe
                read_end, write_end = os.pipe()
                os.write(write_end, seccomp)
                os.close(write_end)
                cmd, pass_fds = ["--seccomp", str(read_end), *cmd], (read_end,)
            cmd, cwd = bwrap_prefix(self.workspace) + cmd, None
        if cgroups_usable():
            self.cgroup = Cgroup(MEMORY_BYTES, MAX_PROCESSES)
            cmd = self.cgroup.prefix() + cmd
        elif not self.isolate:
            cmd = [sys.executable, "-S", "-c", REAPER, *cmd]
        try:
            return await asyncio.create_subprocess_exec(
                *cmd, cwd=cwd, env=worker_env(self.isolate), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True, limit=RESULT_LINE_LIMIT, pass_fds=pass_fds)
        except BaseException:
            self._remove_cgroup()
            raise
        finally:
            for fd in pass_fds:
                os.close(fd)

    async def run(self, code: str) -> ToolResult:
        result = await self._call(code)
        self.calls_over_quota = self.calls_over_quota + 1 if await self.over_quota() else 0
        if self.calls_over_quota:
            return ToolResult(f"{result.output}\n[The working directory is over its {QUOTA_TEXT} quota. Delete "
                              "files now: if it is still over after your next call, or when you submit, the task "
                              "ends as failed.]", is_error=True)
        return result

    async def _call(self, code: str) -> ToolResult:
        if self.killed_for_disk and self.proc is not None:  # killed between calls: this call gets a new worker
            await self.close()
            self.killed_for_disk = False
            result = await self._call(code)
            return ToolResult(f"[Before this call the working directory grew past its {QUOTA_TEXT} quota, so the Python "
                              "process was killed and restarted: variables, imports and functions are lost.]\n"
                              f"{result.output}", result.is_error)
        if self.proc is None:
            self.proc, self.seq = await self._start(), 0
            self.watchdog = asyncio.create_task(self._watch_disk(self.proc))
        proc, self.seq = self.proc, self.seq + 1
        try:
            proc.stdin.write(json.dumps({"code": code, "seq": self.seq}).encode() + b"\n")
            await proc.stdin.drain()
            line = await asyncio.wait_for(proc.stdout.readline(), self.timeout)
        except ValueError:  # a line past the stream limit
            return await self._protocol_violation()
        except TimeoutError:
            await self.close()
            return ToolResult(f"Timed out after {self.timeout:g} s: the Python process was killed and restarted. "
                              "Variables, imports and functions are lost; files in the working directory remain.",
                              is_error=True)
        except (BrokenPipeError, ConnectionResetError):
            line = b""
        if not line:
            code = await self.close()
            if self.killed_for_disk:
                self.killed_for_disk = False
                return ToolResult(f"Stopped: the working directory grew past its {QUOTA_TEXT} quota, and the Python "
                                  "process was killed and restarted. Variables, imports and functions are lost.",
                                  is_error=True)
            # Anything here was written before the worker took over its stderr: a start-up failure.
            startup = (await proc.stderr.read(2000)).decode(errors="replace")
            return ToolResult(f"The Python process ended during this call (exit status {code}) and was restarted. "
                              "Its output is lost, and so are variables, imports and functions; "
                              f"files in the working directory remain.\n{startup}".rstrip(), is_error=True)
        try:  # a line written by the model's code is caught here, at the latest one call later
            result = json.loads(line)
            if result["seq"] == self.seq:
                return ToolResult(str(result["output"]) or "(no output)", bool(result["error"]))
        except (ValueError, TypeError, KeyError):
            pass
        return await self._protocol_violation()

    async def _watch_disk(self, proc: asyncio.subprocess.Process) -> None:
        """Kill the worker when the workspace grows past the quota, during a call or between calls
        (a thread or a child process can keep writing). A workspace already over it may shrink."""
        cgroup = self.cgroup  # this worker's, even if a later one has replaced it by the time it is killed
        before = await asyncio.to_thread(workspace_bytes, self.workspace, MAX_WORKSPACE_ENTRIES)
        while proc.returncode is None:
            await asyncio.sleep(QUOTA_POLL_S)
            used = await asyncio.to_thread(workspace_bytes, self.workspace, MAX_WORKSPACE_ENTRIES)
            if used > WORKSPACE_QUOTA_BYTES and used > before:
                self.killed_for_disk = True
                await asyncio.to_thread(self._kill, proc, cgroup)
                return
            before = used

    async def over_quota(self) -> bool:
        return await asyncio.to_thread(workspace_bytes, self.workspace, MAX_WORKSPACE_ENTRIES) > WORKSPACE_QUOTA_BYTES

    async def _protocol_violation(self) -> ToolResult:
        """The result channel carried something other than this call's result: code wrote to it."""
        await self.close()
        return ToolResult("The harness's result channel carried something other than this call's result (code "
                          "wrote to it), so the Python process was restarted; this call's code may not have run. "
                          "Output is lost, and so are variables, imports and functions; files in the working "
                          "directory remain.", is_error=True)

    async def close(self) -> int | None:
        """Kill the worker and everything it started; the next call starts a fresh one."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        self.watchdog.cancel()
        await asyncio.to_thread(self._kill, proc, self.cgroup)
        code = await proc.wait()
        await asyncio.to_thread(self._remove_cgroup)
        return code

    def _kill(self, proc: asyncio.subprocess.Process, cgroup: Cgroup | None) -> None:
        """SIGKILL the worker's process group, and every process in its cgroup (setsid escapes that);
        without a cgroup in plain mode, the reaper launcher first kills what left the group."""
        if proc.returncode is None and cgroup is None and not self.isolate:
            try:
                os.kill(proc.pid, signal.SIGTERM)
                for _ in range(200):  # up to 2 s for it to kill every process it adopted, then exit
                    if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
                        break
                    time.sleep(0.01)
            except (ProcessLookupError, ChildProcessError):
                pass
        if proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if cgroup is not None:
            cgroup.kill()

    def _remove_cgroup(self) -> None:
        if self.cgroup is not None:
            self.cgroup.remove()
            self.cgroup = None


class SubmitError(Exception):
    """A submission the harness refuses; the message is for the model."""


def resolve_submission(workspace: Path, path: str) -> Path:
    """The regular file inside the workspace that `path` names, or SubmitError.

    Symlinks are followed as the sandbox sees them: an absolute target under /workspace (or
    the workspace's own path) points into the workspace; any other way out is refused.
    """
    if not isinstance(path, str) or not path or "\0" in path:
        raise SubmitError("path must be a non-empty string")
    if os.path.isabs(path):
        raise SubmitError(f"{path!r} is absolute; give a path relative to the working directory")
    root = Path(workspace).resolve()
    try:
        target = follow_links(root, path)
        is_file = target.is_file()
    except OSError as e:
        raise SubmitError(f"{path!r} cannot be opened: {e.strerror}")
    if not is_file:
        raise SubmitError(f"{path!r} is not a file in the working directory")
    return target


def follow_links(root: Path, path: str) -> Path:
    """Resolve `path` below root one component at a time, never leaving root."""
    parts, below, links = list(PurePosixPath(path).parts), [], 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if not below:
                raise SubmitError(f"{path!r} resolves outside the working directory")
            below.pop()
        elif part != "." and not root.joinpath(*below, part).is_symlink():
            below.append(part)
        elif part != ".":
            links += 1
            if links > MAX_SYMLINKS:
                raise SubmitError(f"{path!r} has too many levels of symbolic links")
            target = PurePosixPath(os.readlink(root.joinpath(*below, part)))
            if target.is_absolute():
                base = next((b for b in (SANDBOX_WORKSPACE, str(root)) if target.is_relative_to(b)), None)
                if base is None:
                    raise SubmitError(f"{path!r} resolves outside the working directory")
                below, target = [], target.relative_to(base)
            parts = list(target.parts) + parts
    return root.joinpath(*below)


def copy_submission(source: Path, dest: Path, max_bytes: int) -> None:
    """Copy at most max_bytes + 1 bytes of a regular file, never following a symlink."""
    try:  # a harness that is not root cannot read a file the model made unreadable (chmod 000)
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise SubmitError(f"{source.name} cannot be read: {e.strerror}")
    with os.fdopen(fd, "rb") as src, open(dest, "wb") as out:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SubmitError(f"{source.name} is not a regular file")
        out.write(src.read(max_bytes + 1))


async def take_submission(sandbox: Sandbox, path) -> Path:
    """Stop the worker, then copy the submitted file out of the workspace for grading. Every check
    that can refuse it runs first, while the worker and its variables are still there."""
    copy = sandbox.workspace.parent / "submission.npz"
    copy_submission(resolve_submission(sandbox.workspace, path), copy, MAX_SUBMISSION_BYTES)
    await sandbox.close()  # nothing may change the path while it is resolved and copied again, for good
    copy_submission(resolve_submission(sandbox.workspace, path), copy, MAX_SUBMISSION_BYTES)
    return copy


def sandbox_report(isolate: bool) -> str:
    """What bounds the workers on this host, for the run report."""
    parts = [f"bubblewrap (workspace at {SANDBOX_WORKSPACE})" if isolate else
             "WARNING: not isolated (bwrap missing or unusable): plain processes"]
    if isolate:
        parts.append("no new user namespaces (seccomp)" if userns_filter() else
                     "WARNING: user namespaces not blocked (no seccomp filter for this architecture)")
    if cgroups_usable():
        parts.append(f"cgroup per worker: {MEMORY_BYTES >> 30} GiB memory, {MAX_PROCESSES} processes")
    else:  # RLIMIT_NPROC counts a whole uid's processes, so it binds only under a uid of the worker's own
        processes = f"{MAX_PROCESSES} processes (RLIMIT_NPROC, a uid per worker)" if isolate and os.geteuid() == 0 \
            else "processes NOT bounded"
        parts.append(f"WARNING: no cgroup could be created: memory bounded per process only (RLIMIT_AS), {processes}; "
                     f"to bound the whole sweep, start it as {SYSTEMD_SCOPE} python main.py ...")
    return "; ".join(parts)
