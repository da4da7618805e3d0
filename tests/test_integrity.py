"""Reward integrity: whatever file is submitted, grading returns a Grade, the same one every time."""
import io
import json
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import bz2_bomb, reference, set_header_field

from grader import grade
from task import TOLERANCE, make_instance

ROOT = Path(__file__).resolve().parents[1]


def archive(weights: dict, compression: int = zipfile.ZIP_STORED) -> bytes:
    """An .npz built member by member, so that any compression method can be used."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, array in weights.items():
            member = io.BytesIO()
            np.save(member, array)
            zf.writestr(name + ".npy", member.getvalue())
    return buf.getvalue()


def corrupt_first_stream(data: bytes) -> bytes:
    """Garble the bytes just after the first local header: the start of a compressed stream."""
    data = bytearray(data)
    at = data.find(b"PK\x03\x04")
    name_len, extra_len = struct.unpack_from("<HH", data, at + 26)
    start = at + 30 + name_len + extra_len
    data[start:start + 16] = bytes(range(200, 216))
    return bytes(data)


@pytest.fixture(scope="module")
def ref() -> dict:
    return reference(1, 0)


@pytest.mark.parametrize("make", [
    lambda w: set_header_field(archive(w), "flags", 0x1, bits=True),  # encrypted: zipfile raises RuntimeError
    lambda w: set_header_field(archive(w), "method", 99),  # unknown compression: refused by its method
    lambda w: corrupt_first_stream(archive(w, zipfile.ZIP_DEFLATED)),  # zlib.error
    lambda w: corrupt_first_stream(archive(w, zipfile.ZIP_LZMA)),  # refused by its method, as is bzip2
    lambda w: corrupt_first_stream(archive(w, zipfile.ZIP_BZIP2)),
    lambda w: archive({"model.norm.weight.npy": np.frombuffer(archive(w), np.uint8)}),  # an archive inside
], ids=["encrypted", "unknown_method", "bad_deflate", "bad_lzma", "bad_bzip2", "nested"])
def test_archives_zipfile_rejects_are_labelled_failures(make, ref, tmp_path):
    path = tmp_path / "sub.npz"
    path.write_bytes(make(ref))
    g = grade(path, 1, 0)
    assert not g.passed and g.label in ("unreadable", "missing_key", "bad_shape", "bad_dtype"), g


def mutate(data: bytes, rng: np.random.Generator, ref: dict) -> bytes:
    kind = rng.integers(5)
    data = bytearray(data)
    if kind == 0:  # random byte flips
        for at in rng.integers(len(data), size=int(rng.integers(1, 20))):
            data[at] ^= int(rng.integers(1, 256))
    elif kind == 1:  # truncation
        data = data[: int(rng.integers(len(data)))]
    elif kind == 2:  # header fields: sizes, offsets, method, flags
        at = data.find(b"PK\x01\x02" if rng.integers(2) else b"PK\x03\x04")
        field = int(rng.integers(4, 30))
        data[at + field] = int(rng.integers(256))
    elif kind == 3:  # a member renamed to another expected name
        names = list(ref)
        a, b = rng.choice(len(names), size=2, replace=False)
        return archive({names[b] if k == names[a] else names[a] if k == names[b] else k: v for k, v in ref.items()})
    else:  # another method, then a flip in the compressed stream
        method = [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA][int(rng.integers(3))]
        data = bytearray(archive(ref, method))
        data[int(rng.integers(len(data)))] ^= 0xFF
    return bytes(data)


@pytest.mark.soak  # long: python -m pytest -m soak (.ci/run runs it)
def test_fuzzed_submissions_never_raise_and_never_pass_wrongly(ref, tmp_path):
    rng = np.random.default_rng(0)
    valid = archive(ref)
    path = tmp_path / "sub.npz"
    outcomes = set()
    for _ in range(300):
        path.write_bytes(mutate(valid, rng, ref))
        g = grade(path, 1, 0)  # must not raise
        outcomes.add(g.label)
        if g.passed:  # only a file whose tensors still are the reference conversion may pass
            with np.load(path) as f:
                assert all(np.allclose(f[k], ref[k], rtol=1e-6, atol=TOLERANCE) for k in ref)
    assert len(outcomes) >= 3, outcomes


def test_a_correct_conversion_stored_too_coarsely_fails_as_precision(save):
    """float16 cannot hold this level-5 instance's weights closely enough (seed 505)."""
    g = grade(save({k: v.astype(np.float16) for k, v in reference(5, 505).items()}), 5, 505)
    assert (g.passed, g.label) == (False, "precision") and g.max_error > TOLERANCE


def test_the_same_file_grades_the_same_every_time(save):
    """A float16 conversion near the tolerance: five gradings, one result."""
    weights = {k: v.astype(np.float16) for k, v in reference(3, 500).items()}
    path = save(weights)
    grades = {(g.passed, g.label, g.max_error) for g in (grade(path, 3, 500) for _ in range(5))}
    assert len(grades) == 1, grades
    # Other bytes draw other sequences, and this file's error depends on them.
    other = grade(save({**weights, "nonce": np.zeros(1)}, "other.npz"), 3, 500)
    assert other.max_error != grades.pop()[2]


def test_a_header_that_crashes_numpys_parser_is_unreadable(ref, tmp_path):
    """A dict header with an unhashable key makes numpy's parser raise TypeError: a labelled failure."""
    header = b"{[1]: 2, 'descr': '<f8', 'fortran_order': False, 'shape': (1,)}"
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    member = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"\0" * 8
    data = archive(ref)
    path = tmp_path / "sub.npz"
    with zipfile.ZipFile(path, "w") as zf, zipfile.ZipFile(io.BytesIO(data)) as src:
        for info in src.infolist():
            zf.writestr(info.filename, member if info.filename.startswith("model.embed_tokens") else src.read(info))
    g = grade(path, 1, 0)
    assert (g.passed, g.label) == (False, "unreadable") and "TypeError" in g.detail


def test_the_grader_reads_what_np_load_reads(ref, tmp_path):
    """Junk before the archive: np.load refuses it, and so does the grader. Members without the .npy
    suffix: np.load(...)[name] reads them, and so does the grader."""
    path = tmp_path / "sub.npz"
    path.write_bytes(b"junk" + archive(ref))
    with pytest.raises(ValueError, match="pickled"):
        np.load(path, allow_pickle=False)
    assert grade(path, 1, 0).label == "unreadable"
    with zipfile.ZipFile(path, "w") as zf:
        for name, array in ref.items():
            member = io.BytesIO()
            np.save(member, array)
            zf.writestr(name, member.getvalue())
    with np.load(path, allow_pickle=False) as f:
        assert all(np.array_equal(f[k], v) for k, v in ref.items())
    assert grade(path, 1, 0).passed


def test_a_label_names_a_mistake_only_when_it_explains_every_difference(save):
    """All zeros happens to match a few tensors of some wrong conversion: still no mistake is named."""
    for seed in range(3):
        weights = {k: np.zeros_like(v) for k, v in reference(8, seed).items()}
        g = grade(save(weights), 8, seed)
        assert (g.passed, g.label) == (False, "other"), g.detail
    scaled = reference(3, 2)
    name = next(k for k in scaled if k.endswith("q_proj.weight"))
    scaled[name] = scaled[name] * (1 + 1e-3)  # float64 storage: not a matter of precision
    g = grade(save(scaled), 3, 2)
    assert not g.passed and g.label == "other", g


def test_an_equivalent_conversion_stored_too_coarsely_is_precision_too(save):
    """Heads permuted (an equivalent conversion) and stored as float16 misses as the reference layout does."""
    from test_grader import permute_heads
    inst, rng = make_instance(5, 505), np.random.default_rng(1)
    moved = permute_heads(reference(5, 505), inst.config, np.roll(np.arange(inst.config["num_key_value_heads"]), 1), rng)
    g = grade(save({k: v.astype(np.float16) for k, v in moved.items()}), 5, 505)
    assert (g.passed, g.label) == (False, "precision"), g


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_only_stored_and_deflated_members_are_read(method, ref, tmp_path):
    """What np.savez and np.savez_compressed write passes; the same tensors compressed otherwise are refused,
    the method named."""
    path = tmp_path / "sub.npz"
    for compression in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        path.write_bytes(archive(ref, compression))
        assert grade(path, 1, 0).passed
    path.write_bytes(archive(ref, method))
    g = grade(path, 1, 0)
    assert (g.passed, g.label) == (False, "unreadable") and f"zip method {method}," in g.detail, g


def test_a_member_yields_no_more_than_its_declared_size(ref, tmp_path):
    """Defence in depth: a deflated member holding a whole valid tensor but declaring 1000 bytes yields 1000
    bytes (whose CRC then fails), so what members inflate to is bounded by what the archive declares (64 MiB
    at most). Read in full, these members would pass."""
    path = tmp_path / "sub.npz"
    path.write_bytes(set_header_field(archive(ref, zipfile.ZIP_DEFLATED), "size", 1000))
    g = grade(path, 1, 0)
    assert (g.passed, g.label) == (False, "unreadable"), g


def test_a_bz2_bomb_fails_at_once_and_the_caller_of_grade_stays_small(tmp_path):
    """2 KiB that inflate to 3 GiB while declaring 1000 bytes: zipfile's bzip2 inflates a member whole to read
    its first bytes, and `python grader.py` once peaked at 6 GiB on such a file. grade(), called twice in a
    fresh Python: the same labelled fail both times, fast, and that process's own peak memory stays small."""
    path = tmp_path / "bomb.npz"
    path.write_bytes(bz2_bomb())
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child of a large pytest would
    # report pytest's own peak.
    code = ("import json, sys, time\nfrom grader import grade\nstart = time.perf_counter()\n"
            "grades = [vars(grade(sys.argv[1], 1, 0)) for _ in range(2)]\n"
            "peak = next(line for line in open('/proc/self/status') if line.startswith('VmHWM:'))\n"
            "print(json.dumps({'grades': grades, 'seconds': time.perf_counter() - start,\n"
            "                  'peak_kib': int(peak.split()[1])}))")
    r = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, check=True)
    out = json.loads(r.stdout)
    first, second = out["grades"]
    assert first == second and (first["passed"], first["label"]) == (False, "unreadable"), first
    assert "zip method 12," in first["detail"]
    assert out["seconds"] < 10 and out["peak_kib"] < 300 * 1024, out
