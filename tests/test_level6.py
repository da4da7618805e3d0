"""Level 6: a mixture-of-experts checkpoint saved with pipeline, virtual-pipeline and expert parallelism."""
import numpy as np
import pytest
from conftest import reference

from data import source_model
from grader import grade
from task import ROUTING_MARGIN, make_instance, original_logits, token_sequences, write_workspace


def permute_experts(w: dict, config: dict, perm: np.ndarray) -> dict:
    """Runtime expert e becomes expert perm[e], its router row moving with it."""
    out = dict(w)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp."
        if p + "gate.weight" not in w:
            continue
        out[p + "gate.weight"] = w[p + "gate.weight"][np.argsort(perm)]
        for e in range(config["num_experts"]):
            for name in ("gate_proj", "up_proj", "down_proj"):
                out[f"{p}experts.{perm[e]}.{name}.weight"] = w[f"{p}experts.{e}.{name}.weight"]
    return out


def fold_scale_into_up_proj(w: dict, config: dict, factor: float) -> dict:
    """The routing scale factor moved from down_proj to up_proj: the same function."""
    w = dict(w)
    for key in [k for k in w if ".mlp.experts." in k and k.endswith("down_proj.weight")]:
        w[key] = w[key] / factor
        w[key.replace("down_proj", "up_proj")] = w[key.replace("down_proj", "up_proj")] * factor
    return w


def test_equivalent_conversions_pass(save):
    inst = make_instance(6, 5)
    ref = reference(6, 5)
    perm = np.array([2, 0, 3, 1])
    permuted = permute_experts(ref, inst.config, perm)
    assert not np.array_equal(permuted["model.layers.1.mlp.gate.weight"], ref["model.layers.1.mlp.gate.weight"])
    folded = fold_scale_into_up_proj(ref, inst.config, inst.args["moe_router_topk_scaling_factor"])
    float32 = {k: v.astype(np.float32) for k, v in permuted.items()}
    for weights in (permuted, folded, float32):
        g = grade(save(weights), 6, 5)
        assert g.passed, g


def test_experts_moved_without_their_router_rows_fail(save):
    inst = make_instance(6, 5)
    moved = permute_experts(reference(6, 5), inst.config, np.array([1, 0, 2, 3]))
    for i in range(inst.config["num_hidden_layers"]):
        key = f"model.layers.{i}.mlp.gate.weight"
        if key in moved:
            moved[key] = reference(6, 5)[key]
    assert not grade(save(moved), 6, 5).passed


def test_rank_files_hold_what_each_rank_saved(tmp_path):
    inst = make_instance(6, 0)
    write_workspace(tmp_path, inst)
    names = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert names == [f"mp_rank_{t:02d}_{p:03d}_{e:03d}.npz" for t in range(2) for p in range(2) for e in range(2)]
    for (t, p, e), tensors in inst.files.items():
        assert ("model0.embedding.word_embeddings.weight" in tensors) == (p == 0)
        assert ("model1.output_layer.weight" in tensors) == (p == 1)
        assert not any(k.startswith(("model1.embedding", "model0.output")) for k in tensors)
        # Dense tensors are the same in both expert ranks' files; expert weights differ.
        other = inst.files[t, p, 1 - e]
        key = "model0.decoder.layers.0.self_attention.linear_qkv.weight"
        assert np.array_equal(tensors[key], other[key])
        if p == 1:  # pipeline rank 1, chunk 0 holds global layer 1, the first MoE layer
            key = "model0.decoder.layers.0.mlp.experts.weight1"
            assert tensors[key].shape == (inst.args["hidden_size"], 2 * 2 * inst.args["hidden_size"])
            assert not np.array_equal(tensors[key], other[key])
    assert "model0.decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in inst.files[0, 0, 0]  # layer 0 is dense


def test_a_tie_in_routing_is_never_compared():
    inst = make_instance(6, 2)
    original, rng = inst.original(), np.random.default_rng(0)
    tokens = np.arange(32)
    drawn = original_logits(original, tokens, rng)
    margins = []
    source_model.forward(original, drawn[0], margins)
    assert min(margins) >= ROUTING_MARGIN
    for files in original.files.values():  # every router row the same: every token at a tie
        for key in [k for k in files if k.endswith("router.weight")]:
            files[key] = np.repeat(files[key][:1], len(files[key]), axis=0)
    assert original_logits(original, tokens, rng) is None


def test_graded_sequences_cover_every_token_clear_of_ties():
    inst = make_instance(6, 3)
    original, rng = inst.original(), np.random.default_rng(1)
    drawn = [original_logits(original, t, rng) for t in token_sequences(inst.args["vocab_size"], rng)]
    assert all(d is not None for d in drawn)
    assert set(np.concatenate([t for t, _ in drawn]).tolist()) == set(range(inst.args["vocab_size"]))


def test_reference_logits_cover_every_token_and_are_the_originals(tmp_path):
    inst = make_instance(6, 4)
    write_workspace(tmp_path, inst)
    with np.load(tmp_path / "reference.npz") as f:
        tokens, logits = f["tokens"], f["logits"]
    assert set(tokens.ravel().tolist()) == set(range(inst.args["vocab_size"]))
    assert np.allclose(source_model.forward(inst.original(), tokens[0]), logits[0], atol=1e-12)


@pytest.mark.parametrize("start", range(0, 50, 10))
def test_float32_reference_passes_on_fifty_instances(start, save):
    for seed in range(start, start + 10):
        weights = {k: v.astype(np.float32) for k, v in reference(6, seed).items()}
        g = grade(save(weights), 6, seed)
        assert g.passed, (seed, g)


def test_float32_reference_passes_on_twenty_draws_of_sequences(save):
    """Files that differ only in an ignored key are graded on different sequences."""
    for seed in (100, 101, 102):
        weights = {k: v.astype(np.float32) for k, v in reference(6, seed).items()}
        for nonce in range(20):
            g = grade(save({**weights, "nonce": np.array([nonce])}), 6, seed)
            assert g.passed, (seed, nonce, g)
