"""Nothing model code can read holds the answer: it walks every file the real sandbox shows."""
import ast
import asyncio
import shutil
import subprocess
import sys
import zipfile

import pytest
from test_tools import ROOT, needs_bwrap

from tools import Sandbox, hidden_paths

# Text that only the project's answer-bearing files hold: the failure labels (README.md,
# conversions.py), the diagnosis, the wrong-conversion table, the original model's code, the draws.
ANSWER_KEY = ["grouped_gemm_layout", "zero_centered_norm", "gated_norm_offset", "qkvz_grouping", "def explain_failure(",
              "MISTAKES = {", "def vocab_parallel(", "def gated_delta_net(", "def draw_conventions(", "megatron-port-task"]
MAX_FILE_BYTES = 2**20  # every project file is far smaller; larger files are binaries and archives

SCAN = r"""
import os, stat

def scan(needles, skip, max_bytes):
    # Every readable regular file up to max_bytes, each inode once: (hits, files read).
    hits, read, seen, stack = [], 0, set(), ["/"]
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
            if entry.path in skip or (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            if stat.S_ISDIR(st.st_mode):
                stack.append(entry.path)
            elif stat.S_ISREG(st.st_mode) and st.st_size <= max_bytes:
                try:
                    with open(entry.path, "rb") as f:
                        data = f.read()
                except OSError:
                    continue
                read += 1
                hits += [(entry.path, n.decode()) for n in needles if n in data]
    return hits, read
"""


def scan_sandbox(tmp_path, plant: str = "") -> tuple[list, int]:
    (tmp_path / "ws").mkdir()
    box = Sandbox(tmp_path / "ws", isolate=True, timeout=300)
    call = (f"{plant}\nprint(repr(scan({[n.encode() for n in ANSWER_KEY]!r}, "
            f"{{'/proc', '/sys', '/dev', '/workspace'}}, {MAX_FILE_BYTES})))")

    async def go():
        try:
            return [await box.run(code) for code in (SCAN, call)]
        finally:
            await box.close()
    _, result = asyncio.run(go())
    assert not result.is_error, result.output
    return ast.literal_eval(result.output)


@needs_bwrap
def test_no_file_the_sandbox_can_read_holds_the_answer_key(tmp_path):
    hits, read = scan_sandbox(tmp_path)
    assert read > 1000  # the system and the standard library were walked, not an empty root
    assert hits == []


@needs_bwrap
def test_the_scan_finds_a_planted_copy(tmp_path):
    """The scan above can fail: a copy of README.md where model code can reach it is found."""
    readme = (ROOT / "README.md").read_text()
    plant = f"open('/tmp/notes.md', 'w').write({readme!r})"
    hits, _ = scan_sandbox(tmp_path, plant)
    assert ("/tmp/notes.md", "grouped_gemm_layout") in hits


def test_every_package_directory_of_the_harness_is_hidden():
    hidden = hidden_paths()
    for path in (p for p in sys.path if p.endswith(("site-packages", "dist-packages"))):
        assert path in hidden or not any(path.startswith(h) for h in ("/usr", sys.prefix, sys.base_prefix)), path


def test_the_project_is_not_installed_with_its_readme_as_metadata(tmp_path):
    """What `pip install .` puts in site-packages comes from pyproject.toml: no README text in it."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                        "-w", str(tmp_path), str(source)], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {r.stderr[-300:]}")
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        text = b"".join(zf.read(name) for name in zf.namelist())
    assert not any(n.encode() in text for n in ANSWER_KEY if n != "megatron-port-task")
