"""Grades a submitted runtime checkpoint on numbers alone.

The original model is rebuilt from (level, seed), never read from the workspace; the
runtime is the project's own data/target_model.py. The submission is validated before any
array is loaded, then both models run on token sequences drawn fresh for this grading.
grade() does all of that in a child process bounded in memory and CPU time (bounded.py).
"""
import argparse
import hashlib
import os
import stat
import sys
import zipfile
from pathlib import Path

import numpy as np

from bounded import Grade, run_child, serve_child
from conversions import convert
from data import target_model
from diagnosis import explain_failure
from instances import make_instance, original_logits, token_sequences
from task import LEVELS, MAX_SUBMISSION_BYTES, TOLERANCE, non_negative

PRECISION_SLACK = 2.0  # a float16 file no mistake explains, missing by at most this times the float16 reference


class Invalid(Exception):
    """A submission refused before any logit is computed: Invalid(label, detail)."""


def read_submission(path: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Load exactly the tensors in `shapes`, checking size, header, shape, dtype and values first."""
    try:
        st = os.stat(path, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise Invalid("unreadable", f"{path} is not a regular file")
        if st.st_size > MAX_SUBMISSION_BYTES:
            raise Invalid("too_large", f"file is {st.st_size} bytes, limit {MAX_SUBMISSION_BYTES}")
        if path.read_bytes()[:4] not in (b"PK\x03\x04", b"PK\x05\x06"):  # np.load opens only a file that starts so
            raise Invalid("unreadable", "the file does not start as a zip archive, so np.load would not open it")
        with zipfile.ZipFile(path) as zf:
            members = {info.filename: info for info in zf.infolist()}
            if (unpacked := sum(info.file_size for info in zf.infolist())) > MAX_SUBMISSION_BYTES:
                raise Invalid("too_large", f"archive unpacks to {unpacked} bytes, limit {MAX_SUBMISSION_BYTES}")
            # Stored or deflated, as np.savez and np.savez_compressed write: zipfile's deflate yields no more than a
            # member declares; its bzip2 (method 12) would inflate a whole member to read its first bytes.
            if odd := [(i.filename, i.compress_type) for i in zf.infolist() if i.compress_type not in (0, 8)]:
                raise Invalid("unreadable", "{}: zip method {}, not stored (0) or deflated (8)".format(*odd[0]))
            return {name: read_member(zf, members, name, shape) for name, shape in shapes.items()}
    except (Invalid, MemoryError):  # MemoryError: the bound of the process grading it (bounded.py)
        raise
    except Exception as e:  # noqa: BLE001 -- whatever os, zipfile, its decompressors or numpy's header parser raise
        raise Invalid("unreadable", f"not a readable .npz archive: {type(e).__name__}: {e}")


def read_member(zf: zipfile.ZipFile, members: dict, name: str, shape: tuple[int, ...]) -> np.ndarray:
    # The member np.load(...)[name] reads: `name` itself, else `name.npy`.
    member = members.get(name) or members.get(name + ".npy")
    if member is None:
        _, _, layer, mixer, *_ = name.split(".") + ["", "", "", ""]  # model.layers.N.<mixer>.*
        other = {"self_attn": "linear_attn", "linear_attn": "self_attn"}.get(mixer)
        if other and any(m.startswith(f"model.layers.{layer}.{other}.") for m in members):
            raise Invalid("layer_pattern", f"layer {layer} holds {other} weights where the runtime reads {mixer}")
        raise Invalid("missing_key", f"{name} is missing")
    with zf.open(member) as f:  # zipfile yields no more of a member than its declared size
        v1 = np.lib.format.read_magic(f) == (1, 0)
        got_shape, _, dtype = (np.lib.format.read_array_header_1_0 if v1 else np.lib.format.read_array_header_2_0)(f)
    if got_shape != shape:
        raise Invalid("bad_shape", f"{name} has shape {got_shape}, expected {shape}")
    if dtype.kind != "f" or dtype.itemsize > 8:
        raise Invalid("bad_dtype", f"{name} has dtype {dtype}, expected float16, float32 or float64")
    with zf.open(member) as f:
        array = np.lib.format.read_array(f, allow_pickle=False)
    if not np.all(np.isfinite(array)):
        raise Invalid("not_finite", f"{name} has NaN or infinite values")
    return array


# The one way to grade: grade_in_process in a child process bounded in memory and CPU time (bounded.py),
# so that no file can take the caller's memory; a bound it hits is a failing Grade that names it.
def grade(submission: str | Path, level: int, seed: int) -> Grade:
    return run_child([sys.executable, __file__, f"--level={level}", f"--seed={seed}", "--child", "--", str(submission)])


def grade_in_process(submission: str | Path, level: int, seed: int) -> Grade:
    inst = make_instance(level, seed)
    try:
        stored = read_submission(Path(submission), target_model.expected_shapes(inst.config))
    except Invalid as e:
        label, detail = e.args
        return Grade(False, label, None, detail)
    weights = {k: v.astype(np.float64) for k, v in stored.items()}
    original, runtime = inst.original(), target_model.Model(inst.config, weights)
    # Seeded by the file's bytes: sequences the model cannot know in advance, the same grade every time.
    digest = hashlib.sha256(Path(submission).read_bytes()).digest()
    rng = np.random.default_rng([level, seed, int.from_bytes(digest[:16], "little")])
    with np.errstate(all="ignore"):  # None: no draw clear of a routing tie
        drawn = [d for tokens in token_sequences(inst.args["vocab_size"], rng) if (d := original_logits(original, tokens, rng))]
    if not drawn:  # the instance's fault, not the submission's: main.py records it as an error
        return Grade(False, "ungradable", None, "no token sequence could be drawn clear of a routing tie")
    worst = max_error(runtime, drawn)
    if worst <= TOLERANCE:
        return Grade(True, "pass", worst, f"max |logit difference| {worst:.3g} <= {TOLERANCE:g}")
    reference = convert(inst.files, inst.args, inst.config, optimizer=inst.optimizer)
    label, detail = explain_failure(weights, reference, inst.files, inst.args, inst.config, inst.optimizer, level)
    if label == "other" and any(v.dtype == np.float16 for v in stored.values()):  # does the right conversion,
        rounded = {k: v.astype(np.float16).astype(np.float64) for k, v in reference.items()}  # so stored, miss too?
        if worst <= PRECISION_SLACK * (floor := max_error(target_model.Model(inst.config, rounded), drawn)):
            label, detail = "precision", f"the right conversion stored as float16 misses by {floor:.3g}: too coarse"
    return Grade(False, label, worst, f"max |logit difference| {worst:.3g} > {TOLERANCE:g}; {detail}")


def max_error(model: target_model.Model, drawn: list) -> float:  # over (tokens, logits) pairs; NaN fails
    with np.errstate(all="ignore"):
        return float(np.max([np.max(np.abs(target_model.forward(model, tokens) - logits)) for tokens, logits in drawn]))


def main() -> None:
    parser = argparse.ArgumentParser(description="Grade a converted checkpoint; exit 0 on pass, 1 on fail.")
    parser.add_argument("submission")
    parser.add_argument("--level", type=int, required=True, choices=sorted(LEVELS), help="the instance's level")
    parser.add_argument("--seed", type=non_negative, required=True, help="the instance's seed")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # how grade() runs this file
    a = parser.parse_args()
    if a.child:
        return serve_child(lambda: grade_in_process(a.submission, a.level, a.seed))
    g = grade(a.submission, a.level, a.seed)
    print(f"{'PASS' if g.passed else 'FAIL'} {g.label}: {g.detail}")
    sys.exit(0 if g.passed else 1)


if __name__ == "__main__":
    main()
