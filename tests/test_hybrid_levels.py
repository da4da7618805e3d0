"""Levels 10-11: a Qwen3-Next-style hybrid (Gated DeltaNet and output-gated attention) on top of
level 8, and the layout of the distributed optimizer's buffers, stated independently."""
import numpy as np
import pytest
from conftest import reference

from conversions import MISTAKES, buffers
from data import target_model
from grader import grade
from task import build_prompt, make_instance, write_workspace


def test_layers_follow_megatrons_pattern_across_chunks():
    inst = make_instance(10, 1)  # with the attention output gate and zero-centred gamma
    assert inst.args["attention_output_gate"] and inst.args["layernorm_zero_centered_gamma"]
    # linear_attention_freq 4: layer i is full attention iff (i + 1) % 4 == 0; with pp 2 and vpp 2 global
    # layer 3 is chunk 1 of pipeline rank 1, the only file with attention weights.
    assert inst.config["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]
    for (t, p, e), tensors in inst.files.items():
        assert ("model1.decoder.layers.0.self_attention.linear_qkv.weight" in tensors) == (p == 1)
        assert ("model0.decoder.layers.0.self_attention.in_proj.weight" in tensors)
    a, tp = inst.args, 2
    nk, nv, dk, dv = (a[f"linear_{k}"] for k in ("num_key_heads", "num_value_heads", "key_head_dim", "value_head_dim"))
    assert (nk, nv) == (4, 8) and dk != dv and a["linear_conv_kernel_dim"] == 4
    w = inst.files[1, 0, 0]
    p = "model0.decoder.layers.0.self_attention."
    assert w[p + "in_proj.weight"].shape == ((2 * nk * dk + 2 * nv * dv + 2 * nv) // tp, a["hidden_size"])
    assert w[p + "conv1d.weight"].shape == ((2 * nk * dk + nv * dv) // tp, 1, 4)
    assert w[p + "A_log"].shape == w[p + "dt_bias"].shape == (nv // tp,)
    # GatedDeltaNet's own parameters come before its submodules' (named_parameters() order).
    layer = [k.removeprefix(p) for k in w if k.startswith(p)]
    assert layer[:4] == ["dt_bias", "A_log", "in_proj.layer_norm_weight", "in_proj.weight"]
    gated = inst.files[0, 1, 0]["model1.decoder.layers.0.self_attention.linear_qkv.weight"]
    assert gated.shape[0] == (2 * a["num_attention_heads"] + 2 * a["num_query_groups"]) * a["kv_channels"] // tp
    norm = inst.main[0, 0, 0][p + "out_norm.weight"]
    assert np.all(norm != 0) and np.abs(norm).max() < 2  # zero-centred gamma, random and non-zero


def test_level_11_shows_nothing_to_check_against(tmp_path):
    write_workspace(tmp_path, make_instance(11, 0))
    assert not (tmp_path / "reference.npz").exists()
    assert "- No reference.npz and no source_model.py" in build_prompt(11, 40)


def permute_value_heads(w: dict, config: dict, rng) -> dict:
    """Shuffle the value heads inside each key-head group, moving every tensor that is per value head."""
    w, nk, nv = dict(w), config["linear_num_key_heads"], config["linear_num_value_heads"]
    dk, dv, H, r = config["linear_key_head_dim"], config["linear_value_head_dim"], config["hidden_size"], nv // nk
    within = [rng.permutation(r) for _ in range(nk)]
    heads = np.concatenate([g * r + order for g, order in enumerate(within)])  # new head h reads old head heads[h]
    for i, kind in enumerate(config["layer_types"]):
        if kind != "linear_attention":
            continue
        p = f"model.layers.{i}.linear_attn."
        qkvz = w[p + "in_proj_qkvz.weight"].reshape(nk, 2 * dk + 2 * r * dv, H)
        q, k, v, z = np.split(qkvz, [dk, 2 * dk, 2 * dk + r * dv], axis=1)
        v, z = (x.reshape(nk, r, dv, H)[np.arange(nk)[:, None], np.array(within)] for x in (v, z))
        w[p + "in_proj_qkvz.weight"] = np.concatenate([q, k, v.reshape(nk, -1, H), z.reshape(nk, -1, H)], 1).reshape(-1, H)
        b, a = np.split(w[p + "in_proj_ba.weight"].reshape(nk, 2 * r, H), 2, axis=1)
        b, a = (x[np.arange(nk)[:, None], np.array(within)] for x in (b, a))
        w[p + "in_proj_ba.weight"] = np.concatenate([b, a], axis=1).reshape(-1, H)
        conv = w[p + "conv1d.weight"]
        cv = conv[2 * nk * dk:].reshape(nv, dv, *conv.shape[1:])[heads].reshape(-1, *conv.shape[1:])
        w[p + "conv1d.weight"] = np.concatenate([conv[:2 * nk * dk], cv])
        w[p + "A_log"], w[p + "dt_bias"] = w[p + "A_log"][heads], w[p + "dt_bias"][heads]
        w[p + "out_proj.weight"] = w[p + "out_proj.weight"].reshape(H, nv, dv)[:, heads].reshape(H, -1)
    return w


def permute_experts(w: dict, config: dict, rng) -> dict:
    """Relabel the routed experts, moving the router's rows with them."""
    w, n = dict(w), config["num_experts"]
    order = rng.permutation(n)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp."
        if p + "gate.weight" in w:
            w[p + "gate.weight"] = w[p + "gate.weight"][order]
            if p + "gate.e_score_correction_bias" in w:
                w[p + "gate.e_score_correction_bias"] = w[p + "gate.e_score_correction_bias"][order]
            moved = {new: {k: w[f"{p}experts.{old}.{k}"] for k in ("gate_proj.weight", "up_proj.weight", "down_proj.weight")}
                     for new, old in enumerate(order)}
            w |= {f"{p}experts.{new}.{k}": v for new, ts in moved.items() for k, v in ts.items()}
    return w


@pytest.mark.parametrize("seed", [0, 4])
def test_equivalent_hybrid_conversions_pass(seed, save):
    inst, rng = make_instance(10, seed), np.random.default_rng(seed)
    ref = reference(10, seed)
    heads, experts = permute_value_heads(ref, inst.config, rng), permute_experts(ref, inst.config, rng)
    for moved in (heads, experts):
        assert any(not np.array_equal(moved[k], ref[k]) for k in ref)
    float32 = {k: v.astype(np.float32) for k, v in permute_experts(heads, inst.config, rng).items()}
    for weights in (heads, experts, float32):
        g = grade(save(weights), 10, seed)
        assert g.passed, g


def test_each_hybrid_convention_changes_what_it_names():
    """Every level-10 mistake changes exactly the tensors of its convention, so each label is specific."""
    inst = make_instance(10, 1)  # gated attention with a qkv bias, zero-centred gamma: every mistake in play
    assert inst.args["attention_output_gate"] and inst.args["add_qkv_bias"] and inst.args["layernorm_zero_centered_gamma"]
    ref = reference(10, 1)
    from conversions import convert
    touched = {}
    for mistake in (m for m, first in MISTAKES.items() if first == 10 and m != "layer_pattern"):
        wrong = convert(inst.files, inst.args, inst.config, mistake, inst.optimizer)
        touched[mistake] = {k.split(".", 3)[3] for k in ref if not np.array_equal(wrong[k], ref[k])}
    assert touched == {"gdn_tp_merge": {"linear_attn.in_proj_qkvz.weight", "linear_attn.in_proj_ba.weight"},
                       "qkvz_grouping": {"linear_attn.in_proj_qkvz.weight", "linear_attn.in_proj_ba.weight"},
                       "conv_channels": {"linear_attn.conv1d.weight"},
                       "gdn_decay_split": {"linear_attn.A_log", "linear_attn.dt_bias"},
                       "gated_norm_offset": {"linear_attn.norm.weight"},
                       "output_gate_layout": {"self_attn.q_proj.weight", "self_attn.q_proj.bias"}}


def test_the_runtime_reads_the_hybrid_as_configured():
    config = make_instance(10, 2).config
    shapes = target_model.expected_shapes(config)
    assert "model.layers.3.self_attn.q_proj.weight" in shapes and "model.layers.0.linear_attn.A_log" in shapes
    assert shapes["model.layers.3.self_attn.q_proj.weight"][0] == 2 * config["num_attention_heads"] * config["head_dim"]
    assert not any(k.startswith("model.layers.3.linear_attn") for k in shapes)


def test_buffer_offsets_follow_megatrons_rules_stated_independently():
    """The writer and the reader share conversions.buffers, so a mistake there could pass every other test.
    Here the offsets of one small instance are worked out from Megatron's rules alone: named_parameters()
    order, reversed; each start rounded up to a multiple of 64; the dp-rank-0 gather keeps numel_unpadded."""
    inst = make_instance(10, 0)
    tensors = inst.main[0, 0, 0]
    chunk0 = [k for k in tensors if k.startswith("model0.")]  # pipeline rank 0, chunk 0: embedding, GDN + dense
    expected, end = {}, 0
    for name in reversed(chunk0):
        start = (end + 63) // 64 * 64
        expected[name], end = start, start + tensors[name].size
    assert chunk0[0] == "model0.embedding.word_embeddings.weight" and chunk0[1].endswith("self_attention.dt_bias")
    starts, numel = buffers(tensors, inst.args, expert=False)[0]
    assert starts == expected and numel == end
    flat = inst.optimizer[0, 0, 0]["0/0/bfloat16,float32/param"]
    assert flat.size == end and int(inst.optimizer[0, 0, 0]["0/0/bfloat16,float32/numel_unpadded"]) == end
    for name, start in expected.items():
        assert np.array_equal(flat[start:start + tensors[name].size], tensors[name].ravel()), name
    gaps = np.ones(end, bool)
    for name, start in expected.items():
        gaps[start:start + tensors[name].size] = False
    assert gaps.any() and not flat[gaps].any()  # the alignment padding holds zeros
