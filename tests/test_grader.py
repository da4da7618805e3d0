import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import reference

from conversions import MISTAKES, convert, convert_workspace
from data import source_model, target_model
from diagnosis import mistakes_in_play
from grader import grade
from instances import LEVELS, SEQ_LEN, make_instance, write_workspace
from task import TOLERANCE

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("level", sorted(LEVELS))
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_reference_conversion_passes(level, seed, save):
    g = grade(save(reference(level, seed)), level, seed)
    assert g.passed and g.label == "pass" and g.max_error <= TOLERANCE


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_each_wrong_conversion_in_play_fails_with_its_label(level, save):
    inst = make_instance(level, 3)
    ref = reference(level, 3)
    play = dict(mistakes_in_play(inst.files, inst.args, inst.config, inst.optimizer, level, ref))
    assert len(play) >= 3 + (level > 1)
    for mistake, wrong in play.items():
        g = grade(save(wrong), level, 3)
        assert not g.passed and g.label == mistake, (mistake, g)
        assert g.max_error > 100 * TOLERANCE if mistake != "layer_pattern" else g.max_error is None  # refused unread


def test_every_mistake_is_in_play_on_some_instance():
    """Over seeds 0-9 of each level, every mistake of that level or below has an instance that shows it."""
    seen = set()
    for level in LEVELS:
        for seed in range(10):
            inst = make_instance(level, seed)
            ref = convert(inst.files, inst.args, inst.config, optimizer=inst.optimizer)
            seen |= {m for m, _ in mistakes_in_play(inst.files, inst.args, inst.config, inst.optimizer, level, ref)}
    assert seen == set(MISTAKES)


def kv_of(head: int, config: dict) -> int:
    """The kv head that runtime query head `head` reads."""
    groups = config["num_key_value_heads"]
    per_group = config["num_attention_heads"] // groups
    return head // per_group


def permute_heads(w: dict, config: dict, group_perm: np.ndarray, rng) -> dict:
    """Relabel kv heads by group_perm and shuffle the query heads that share each kv head."""
    w = dict(w)
    heads, d = config["num_attention_heads"], config["head_dim"]
    q_order = np.empty(heads, int)
    for g in range(config["num_key_value_heads"]):
        new = [t for t in range(heads) if kv_of(t, config) == g]
        old = rng.permutation([s for s in range(heads) if kv_of(s, config) == group_perm[g]])
        q_order[new] = old
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}.self_attn."
        for name, order in (("q_proj", q_order), ("k_proj", group_perm), ("v_proj", group_perm)):
            for kind in ("weight", "bias"):
                if p + f"{name}.{kind}" in w:
                    t = w[p + f"{name}.{kind}"]
                    w[p + f"{name}.{kind}"] = t.reshape(-1, d, *t.shape[1:])[order].reshape(t.shape)
        o = w[p + "o_proj.weight"]
        w[p + "o_proj.weight"] = o.reshape(o.shape[0], heads, d)[:, q_order].reshape(o.shape)
    return w


@pytest.mark.parametrize("level, seed", [(1, 1), (2, 0), (4, 5)])  # grouped-query attention: heads share kv heads
def test_equivalent_conversions_pass(level, seed, save, tmp_path):
    inst, rng = make_instance(level, seed), np.random.default_rng(0)
    ref = reference(level, seed)
    groups = inst.config["num_key_value_heads"]
    within = permute_heads(ref, inst.config, np.arange(groups), rng)
    across = permute_heads(ref, inst.config, np.roll(np.arange(groups), 1), rng)
    for moved in (within, across):
        assert any(not np.array_equal(moved[k], ref[k]) for k in ref)
    float32 = {k: v.astype(np.float32) for k, v in ref.items()}
    extra = {**ref, "rotary.inv_freq": np.ones(3), "notes": np.array([1, 2])}
    for weights in (within, across, float32, extra):
        g = grade(save(weights), level, seed)
        assert g.passed, g
    np.savez_compressed(tmp_path / "compressed.npz", **float32)  # deflated members
    assert grade(tmp_path / "compressed.npz", level, seed).passed


def test_source_weights_under_their_own_names_fail(save):
    inst = make_instance(1, 0)
    g = grade(save({k: source_model.bf16_to_float(v) for k, v in inst.files[0, 0, 0].items()}), 1, 0)
    assert (g.passed, g.label) == (False, "missing_key")


def test_editing_the_workspace_runtime_config_does_not_help(tmp_path):
    """A conversion made for an edited config.json matches only the edited runtime."""
    inst = make_instance(3, 0)
    write_workspace(tmp_path, inst)
    edited = tmp_path / "config.json"
    edited.write_text(json.dumps(inst.config | {"scale_embeddings": not inst.config["scale_embeddings"]}))
    convert_workspace(str(tmp_path / "sub.npz"), workspace=str(tmp_path))
    tokens = np.arange(SEQ_LEN)
    ckpt = source_model.load_checkpoint(tmp_path)
    mine = target_model.load_checkpoint(tmp_path / "sub.npz", edited)
    assert np.abs(target_model.forward(mine, tokens) - source_model.forward(ckpt, tokens)).max() < TOLERANCE
    g = grade(tmp_path / "sub.npz", 3, 0)
    assert (g.passed, g.label) == (False, "embed_scale")


def test_a_pickle_is_never_unpickled(tmp_path, save):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    raw = tmp_path / "raw.npz"
    raw.write_bytes(pickle.dumps({"model.norm.weight": Evil()}))
    assert grade(raw, 1, 0).label == "unreadable"
    ref = reference(1, 0)
    objects = np.empty(ref["model.norm.weight"].shape, dtype=object)
    objects[:] = Evil()
    g = grade(save({**ref, "model.norm.weight": objects}), 1, 0)
    assert (g.passed, g.label) == (False, "bad_dtype")
    assert not marker.exists()


@pytest.mark.parametrize("change, label", [
    (lambda w: {**w, "lm_head.weight": w["lm_head.weight"][:-1]}, "bad_shape"),
    (lambda w: {**w, "lm_head.weight": w["lm_head.weight"].T}, "bad_shape"),
    (lambda w: {k: v for k, v in w.items() if k != "model.norm.weight"}, "missing_key"),
    (lambda w: {**w, "model.norm.weight": np.full_like(w["model.norm.weight"], np.nan)}, "not_finite"),
    (lambda w: {**w, "model.norm.weight": w["model.norm.weight"].astype(int)}, "bad_dtype"),
])
def test_malformed_tensors_are_refused(change, label, save):
    g = grade(save(change(reference(1, 0))), 1, 0)
    assert (g.passed, g.label, g.max_error) == (False, label, None)


def test_logits_that_overflow_for_one_token_fail(save):
    """Finite weights whose logits are NaN for a single token id must not slip through."""
    weights = reference(3, 0)
    weights["model.embed_tokens.weight"][7] = 1e308  # times sqrt(hidden): inf, then NaN in the norm
    g = grade(save(weights), 3, 0)
    assert not g.passed and g.max_error != g.max_error  # NaN


def test_files_that_are_not_archives_are_refused(tmp_path):
    fifo = tmp_path / "pipe.npz"
    os.mkfifo(fifo)
    (tmp_path / "text.npz").write_text("hello")
    for path in (tmp_path / "absent.npz", tmp_path, fifo, tmp_path / "text.npz"):
        assert grade(path, 1, 0).label == "unreadable", path


def test_an_archive_that_unpacks_to_gigabytes_is_refused(tmp_path):
    bomb = tmp_path / "bomb.npz"
    with (zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf,
          zf.open("lm_head.weight.npy", "w", force_zip64=True) as f):
        for _ in range(64):  # 1 GiB of zeros
            f.write(bytes(2**24))
    assert bomb.stat().st_size < 8 * 2**20
    g = grade(bomb, 1, 0)
    assert (g.passed, g.label) == (False, "too_large")


def test_level5_workspace_has_no_source_model_code(tmp_path):
    write_workspace(tmp_path, make_instance(5, 0))
    source = (ROOT / "data" / "source_model.py").read_text()
    runtime = (ROOT / "data" / "target_model.py").read_text()
    signatures = [line for line in source.splitlines() if line.startswith("def ") and line not in runtime]
    assert len(signatures) >= 5
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"reference.npz", "megatron_args.json", "config.json"}
    for p in files:
        data = p.read_bytes()
        assert not any(s.encode() in data for s in signatures), p


def test_level5_reference_logits_cover_every_token_and_are_the_originals(tmp_path):
    inst = make_instance(5, 2)
    write_workspace(tmp_path, inst)
    with np.load(tmp_path / "reference.npz") as f:
        tokens, logits = f["tokens"], f["logits"]
    assert set(tokens.ravel()) == set(range(inst.args["vocab_size"]))
    assert np.allclose(source_model.forward(inst.original(), tokens[-1]), logits[-1], atol=1e-12)


def test_instances_are_reproducible_and_vary_with_the_seed():
    a, b, c = make_instance(4, 11), make_instance(4, 11), make_instance(4, 12)
    key = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert a.args == b.args and np.array_equal(a.files[1, 0, 0][key], b.files[1, 0, 0][key])
    assert not (a.args == c.args and np.array_equal(a.files[1, 0, 0][key], c.files[1, 0, 0][key]))


def test_grader_cli_exit_codes(save):
    path = save(reference(1, 0))
    ok = subprocess.run([sys.executable, "grader.py", str(path), "--level", "1", "--seed", "0"],
                        cwd=ROOT, capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and ok.stdout.startswith("PASS")
    bad = subprocess.run([sys.executable, "grader.py", str(path), "--level", "1", "--seed", "1"],
                         cwd=ROOT, capture_output=True, text=True, check=False)
    assert bad.returncode == 1 and bad.stdout.startswith("FAIL") and "Traceback" not in bad.stderr


def test_task_cli_writes_an_instance_and_prints_its_prompt(tmp_path):
    r = subprocess.run([sys.executable, "task.py", "--workspace", str(tmp_path), "--level", "3", "--seed", "4"],
                       cwd=ROOT, capture_output=True, text=True, check=True)
    assert "at most 0.0001" in r.stdout and "source_model.py" in r.stdout and "at most 40 replies" in r.stdout
    assert {p.name for p in tmp_path.iterdir()} == {"checkpoint", "megatron_args.json", "config.json",
                                                    "source_model.py", "source_gdn.py", "target_model.py"}
    assert json.loads((tmp_path / "megatron_args.json").read_text()) == make_instance(3, 4).args
