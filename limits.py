"""What bounds a sandboxed worker beyond bubblewrap's namespaces and the rlimits.

- A seccomp filter (passed to bwrap) that refuses new user namespaces, so model code cannot
  become root in a namespace of its own and mount past the sandbox's limits.
- A cgroup (v1 memory and pids controllers) per worker: memory and process count bounded for
  the whole worker with every process it starts, memfd and tmpfs pages included.
- The workspace's disk usage, which the sandbox checks against a quota.
"""
import errno
import math
import os
import platform
import secrets
import signal
import struct
import time
from functools import cache
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")

# seccomp_data: nr at offset 0, arch at 4, args[0] (low 32 bits on little-endian) at 16.
_SYSCALLS = {"x86_64": (0xC000003E, {"unshare": 272, "clone": 56, "clone3": 435}),
             "aarch64": (0xC00000B7, {"unshare": 97, "clone": 220, "clone3": 435})}
_CLONE_NEWUSER = 0x10000000
_X32_BIT = 0x40000000  # x32 syscalls share x86_64's arch value; refuse them all


def userns_filter() -> bytes | None:
    """A classic-BPF seccomp program: unshare/clone with CLONE_NEWUSER fail with EPERM, clone3
    with ENOSYS (its flags sit behind a pointer; libc then falls back to clone), syscalls of
    another architecture with EPERM. None on an architecture this does not know."""
    if platform.machine() not in _SYSCALLS:
        return None
    arch, nr = _SYSCALLS[platform.machine()]
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, deny, enosys = 0x7FFF0000, 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS
    program = [
        (ld, 0, 0, 4),  # 0: arch
        (jeq, 0, 8, arch),  # 1: another architecture -> 10
        (ld, 0, 0, 0),  # 2: syscall number
        (jge, 6, 0, _X32_BIT),  # 3: -> 10
        (jeq, 6, 0, nr["clone3"]),  # 4: -> 11
        (jeq, 1, 0, nr["unshare"]),  # 5: -> 7
        (jeq, 0, 2, nr["clone"]),  # 6: -> 7, else 9
        (ld, 0, 0, 16),  # 7: flags
        (jset, 1, 0, _CLONE_NEWUSER),  # 8: -> 10, else 9
        (ret, 0, 0, allow),  # 9
        (ret, 0, 0, deny),  # 10
        (ret, 0, 0, enosys),  # 11
    ]
    return b"".join(struct.pack("=HBBI", *op) for op in program)


def _own_cgroup(controller: str) -> Path:
    """The harness's own cgroup directory for a v1 controller."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return CGROUP_ROOT / controller / path.lstrip("/")
    raise OSError(errno.ENOENT, f"no {controller} cgroup")


class Cgroup:
    """One worker's memory and pids cgroups (v1), created below the harness's own."""

    def __init__(self, memory_bytes: int, max_processes: int):
        name = f"megatron-port-{secrets.token_hex(6)}"
        self.memory, self.pids = _own_cgroup("memory") / name, _own_cgroup("pids") / name
        self.memory.mkdir()
        try:
            self.pids.mkdir()
            (self.memory / "memory.limit_in_bytes").write_text(str(memory_bytes))
            if (self.memory / "memory.memsw.limit_in_bytes").exists():  # swap counted too
                (self.memory / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
            (self.pids / "pids.max").write_text(str(max_processes))
        except OSError:
            self.remove()
            raise

    def prefix(self) -> list[str]:
        """A command prefix that moves itself into both cgroups, then runs the rest."""
        join = 'echo $$ > "$1/cgroup.procs" && echo $$ > "$2/cgroup.procs" && shift 2 && exec "$@"'
        return ["/bin/sh", "-c", join, "sh", str(self.memory), str(self.pids)]

    def kill(self) -> None:
        """SIGKILL every process in the cgroup, including any that left the process group."""
        for _ in range(100):
            pids = (self.pids / "cgroup.procs").read_text().split()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)

    def remove(self) -> None:
        for directory in (self.memory, self.pids):
            for _ in range(100):  # a killed process leaves its cgroup a moment after it is reaped
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)


def remove_stale_cgroups(max_age_s: float = 600.0) -> int:
    """Remove the empty worker cgroups, older than max_age_s, that a harness left behind (the kernel may
    release a cgroup after Cgroup.remove stopped waiting); a younger one may belong to a running harness.
    Returns how many were removed."""
    removed = 0
    for controller in ("memory", "pids"):
        for directory in _own_cgroup(controller).glob("megatron-port-*"):
            try:
                if time.time() - directory.stat().st_mtime > max_age_s and not (directory / "cgroup.procs").read_text().split():
                    directory.rmdir()
                    removed += 1
            except OSError:
                pass
    return removed


@cache
def cgroups_usable() -> bool:
    """Whether this harness can create v1 memory and pids cgroups (it must be allowed to write there).
    Checked once per harness, which then also clears what earlier harnesses left behind."""
    try:
        Cgroup(2**30, 8).remove()
        remove_stale_cgroups()
    except (OSError, ValueError):
        return False
    return True


def workspace_bytes(root: Path, max_entries: int) -> float:
    """Disk blocks used below root, each inode once; infinite past max_entries files and directories."""
    seen, total, stack = set(), 0, [root]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            if len(seen) > max_entries:
                return math.inf
            total += st.st_blocks * 512
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
    return total
