"""Grades a submitted runtime checkpoint on numbers alone.

The original model is rebuilt from (level, seed), never read from the workspace; the
runtime is the project's own data/target_model.py. The submission is validated before any
array is loaded, then both models run on token sequences drawn fresh for this grading.
"""
import argparse
import hashlib
import lzma
import os
import stat
import struct
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conversions import MISTAKES, convert
from data import target_model
from task import LEVELS, MAX_SUBMISSION_BYTES, TOLERANCE, make_instance, non_negative, original_logits, token_sequences


@dataclass
class Grade:
    passed: bool
    label: str  # "pass", a convention that was got wrong, or why the file was refused
    max_error: float | None = None  # worst |logit difference|, once the file was valid
    detail: str = ""


# What zipfile, its decompressors and numpy's header parser raise on a malformed archive.
UNREADABLE = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, RuntimeError,
              NotImplementedError, zlib.error, lzma.LZMAError, struct.error)


class Invalid(Exception):
    """A submission refused before any logit is computed: Invalid(label, detail)."""


def read_submission(path: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Load exactly the tensors in `shapes`, checking size, header, shape, dtype and values first."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError as e:
        raise Invalid("unreadable", f"cannot stat {path}: {e.strerror}")
    if not stat.S_ISREG(st.st_mode):
        raise Invalid("unreadable", f"{path} is not a regular file")
    if st.st_size > MAX_SUBMISSION_BYTES:
        raise Invalid("too_large", f"file is {st.st_size} bytes, limit {MAX_SUBMISSION_BYTES}")
    try:
        with zipfile.ZipFile(path) as zf:
            members = {info.filename: info for info in zf.infolist()}
            unpacked = sum(info.file_size for info in zf.infolist())
            if unpacked > MAX_SUBMISSION_BYTES:
                raise Invalid("too_large", f"archive unpacks to {unpacked} bytes, limit {MAX_SUBMISSION_BYTES}")
            return {name: read_member(zf, members, name, shape) for name, shape in shapes.items()}
    except UNREADABLE as e:
        raise Invalid("unreadable", f"not a readable .npz archive: {type(e).__name__}: {e}")


def read_member(zf: zipfile.ZipFile, members: dict, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name + ".npy" not in members:
        raise Invalid("missing_key", f"{name} is missing")
    with zf.open(members[name + ".npy"]) as f:
        version = np.lib.format.read_magic(f)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        got_shape, _, dtype = header(f)
    if got_shape != shape:
        raise Invalid("bad_shape", f"{name} has shape {got_shape}, expected {shape}")
    if dtype.kind != "f" or dtype.itemsize > 8:
        raise Invalid("bad_dtype", f"{name} has dtype {dtype}, expected float16, float32 or float64")
    with zf.open(members[name + ".npy"]) as f:
        array = np.lib.format.read_array(f, allow_pickle=False)
    if not np.all(np.isfinite(array)):
        raise Invalid("not_finite", f"{name} has NaN or infinite values")
    return array.astype(np.float64)


def diagnose(weights: dict[str, np.ndarray], inst) -> tuple[str, str]:
    """Name the known wrong conversion that best explains the tensors that differ."""
    def same(a: np.ndarray, b: np.ndarray) -> bool:
        return a.shape == b.shape and np.allclose(a, b, rtol=1e-3, atol=1e-6)

    reference = convert(inst.files, inst.args, inst.config, optimizer=inst.optimizer)
    differing = [k for k in reference if not same(weights[k], reference[k])]
    if not differing:  # right conversion, stored too coarsely (float16) to meet the tolerance
        return "precision", "every tensor matches the reference conversion to rtol 1e-3"
    scores = {}
    for mistake, level in MISTAKES.items():
        if level <= inst.level:
            wrong = convert(inst.files, inst.args, inst.config, mistake, inst.optimizer)
            explained = sum(same(weights[k], wrong[k]) for k in differing)
            # A mistake that would also have changed tensors the submission got right fits worse.
            overreach = sum(not same(wrong[k], reference[k]) for k in reference if k not in differing)
            scores[mistake] = (explained - overreach, explained)
    best = max(scores, key=scores.get)
    if scores[best][1] == 0:
        return "other", f"first tensor that differs: {differing[0]}"
    return best, f"{len(differing)} tensors differ; they match a conversion that gets {best} wrong"


def grade(submission: str | Path, level: int, seed: int) -> Grade:
    inst = make_instance(level, seed)
    try:
        weights = read_submission(Path(submission), target_model.expected_shapes(inst.config))
    except Invalid as e:
        label, detail = e.args
        return Grade(False, label, None, detail)
    original, runtime = inst.original(), target_model.Model(inst.config, weights)
    # Seeded by the file's bytes: sequences the model cannot know in advance, the same grade every time.
    digest = hashlib.sha256(Path(submission).read_bytes()).digest()
    rng = np.random.default_rng([level, seed, int.from_bytes(digest[:16], "little")])
    errors = []
    with np.errstate(all="ignore"):
        for tokens in token_sequences(inst.args["vocab_size"], rng):
            if drawn := original_logits(original, tokens, rng):  # None: no draw clear of a routing tie
                errors.append(np.max(np.abs(target_model.forward(runtime, drawn[0]) - drawn[1])))
    if not errors:  # the instance's fault, not the submission's: main.py records it as an error
        return Grade(False, "ungradable", None, "no token sequence could be drawn clear of a routing tie")
    worst = float(np.max(errors))  # np.max, unlike max(), lets a NaN through to fail the check below
    if worst <= TOLERANCE:
        return Grade(True, "pass", worst, f"max |logit difference| {worst:.3g} <= {TOLERANCE:g}")
    label, detail = diagnose(weights, inst)
    return Grade(False, label, worst, f"max |logit difference| {worst:.3g} > {TOLERANCE:g}; {detail}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Grade a converted checkpoint; exit 0 on pass, 1 on fail.")
    parser.add_argument("submission")
    parser.add_argument("--level", type=int, required=True, choices=sorted(LEVELS))
    parser.add_argument("--seed", type=non_negative, required=True)
    a = parser.parse_args()
    g = grade(a.submission, a.level, a.seed)
    print(f"{'PASS' if g.passed else 'FAIL'} {g.label}: {g.detail}")
    sys.exit(0 if g.passed else 1)


if __name__ == "__main__":
    main()
