"""Levels 6-9: pipeline and virtual pipeline (6), mixture of experts with expert parallelism (7),
the distributed optimizer's fp32 main parameters (8), and no reference to check against (9)."""
import numpy as np
import pytest
from conftest import reference

from conversions import convert, convert_values, is_parameter
from data import source_model
from grader import grade
from instances import LEVELS, ROUTING_MARGIN, make_instance, original_logits, token_sequences, write_workspace
from task import build_prompt


def permute_experts(w: dict, config: dict, perm: np.ndarray) -> dict:
    """Runtime expert e becomes expert perm[e], its router row moving with it."""
    out = dict(w)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp."
        if p + "gate.weight" not in w:
            continue
        out[p + "gate.weight"] = w[p + "gate.weight"][np.argsort(perm)]
        if p + "gate.e_score_correction_bias" in w:  # the bias that chooses experts moves with them too
            out[p + "gate.e_score_correction_bias"] = w[p + "gate.e_score_correction_bias"][np.argsort(perm)]
        for e in range(config["num_experts"]):
            for name in ("gate_proj", "up_proj", "down_proj"):
                out[f"{p}experts.{perm[e]}.{name}.weight"] = w[f"{p}experts.{e}.{name}.weight"]
    return out


def fold_scale_into_up_proj(w: dict, config: dict, factor: float) -> dict:
    """A factor moved from down_proj to up_proj: the same function."""
    w = dict(w)
    for key in [k for k in w if ".mlp.experts." in k and k.endswith("down_proj.weight")]:
        w[key] = w[key] / factor
        w[key.replace("down_proj", "up_proj")] = w[key.replace("down_proj", "up_proj")] * factor
    return w


@pytest.mark.parametrize("level, seed", [(7, 0), (8, 1)])  # sigmoid routing with an expert bias
def test_equivalent_conversions_pass(level, seed, save):
    inst = make_instance(level, seed)
    assert inst.args["moe_router_enable_expert_bias"]
    ref = reference(level, seed)
    perm = np.array([2, 0, 3, 1])
    permuted = permute_experts(ref, inst.config, perm)
    for name in ("gate.weight", "gate.e_score_correction_bias"):
        assert not np.array_equal(permuted[f"model.layers.1.mlp.{name}"], ref[f"model.layers.1.mlp.{name}"])
    folded = fold_scale_into_up_proj(ref, inst.config, 2.0)
    float32 = {k: v.astype(np.float32) for k, v in permuted.items()}
    fortran = {k: np.asfortranarray(v) for k, v in permuted.items()}
    for weights in (permuted, folded, float32, fortran):
        g = grade(save(weights), level, seed)
        assert g.passed, g


def test_experts_moved_without_their_router_rows_fail(save):
    inst = make_instance(7, 5)
    moved = permute_experts(reference(7, 5), inst.config, np.array([1, 0, 2, 3]))
    for i in range(inst.config["num_hidden_layers"]):
        key = f"model.layers.{i}.mlp.gate.weight"
        if key in moved:
            moved[key] = reference(7, 5)[key]
    assert not grade(save(moved), 7, 5).passed


@pytest.mark.parametrize("level, suffixes", [(5, ["00", "01"]), (6, ["00_000", "00_001", "01_000", "01_001"]),
                                             (7, [f"{t:02d}_{p:03d}_{e:03d}" for t in range(2) for p in range(2)
                                                  for e in range(2)])])
def test_each_rank_saves_its_directory_under_the_latest_iteration(level, suffixes, tmp_path):
    inst = make_instance(level, 0)
    write_workspace(tmp_path, inst)
    checkpoint = tmp_path / "checkpoint"
    iteration = int((checkpoint / "latest_checkpointed_iteration.txt").read_text())
    assert iteration == inst.args["train_iters"] and [p.name for p in checkpoint.iterdir() if p.is_dir()] == \
        [f"iter_{iteration:07d}"]
    ranks = sorted((checkpoint / f"iter_{iteration:07d}").iterdir())
    assert [r.name for r in ranks] == [f"mp_rank_{s}" for s in suffixes]
    assert all(sorted(p.name for p in r.iterdir()) == ["model_optim_rng.npz"] for r in ranks)


def test_rank_files_hold_what_each_rank_saved():
    inst = make_instance(7, 4)  # legacy GroupedMLP, RMSNorm, a gated shared expert
    assert inst.args["moe_use_legacy_grouped_gemm"] and inst.args["moe_shared_expert_gate"]
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
    layer = [k.removeprefix("model0.decoder.layers.0.") for k in inst.files[0, 1, 0]
             if k.startswith("model0.decoder.layers.0.")]
    # The state dict's order: a module's parameters, then TE's extra state, then its submodules'.
    assert layer[:5] == ["self_attention.core_attention._extra_state", "self_attention.linear_proj.weight",
                         "self_attention.linear_proj._extra_state", "self_attention.linear_qkv.layer_norm_weight",
                         "self_attention.linear_qkv.weight"]
    # SharedExpertMLP's own gate_weight comes before its linear layers (named_parameters() visits a module first).
    assert layer[-5:] == ["mlp.shared_experts.gate_weight", "mlp.shared_experts.linear_fc1.weight",
                          "mlp.shared_experts.linear_fc1._extra_state", "mlp.shared_experts.linear_fc2.weight",
                          "mlp.shared_experts.linear_fc2._extra_state"]


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_every_te_extra_state_is_an_empty_uint8_array_norms_included(level):
    """As TE 2.9 and later (PR #2253) save them, which Megatron-LM 77a00ec1c9 asks for: no entry marks a norm."""
    files = make_instance(level, 0).files.values()
    extra = {k: v for f in files for k, v in f.items() if k.endswith("_extra_state")}
    assert any(k.endswith("final_layernorm._extra_state") for k in extra)
    assert all(v.dtype == np.uint8 and v.shape == (0,) for v in extra.values())


def test_optimizer_state_is_saved_where_megatron_saves_it(tmp_path):
    inst = make_instance(8, 0)
    write_workspace(tmp_path, inst)
    rank_dirs = sorted((tmp_path / "checkpoint").glob("iter_*/mp_rank_*"))
    assert len(rank_dirs) == 8 and all((d / "distrib_optim.npz").is_file() for d in rank_dirs)
    for (t, p, e), state in inst.optimizer.items():
        # The dense optimizer (entry 0) is saved by data-parallel rank 0 only, which is expert rank 0.
        assert {k.split("/")[0] for k in state} == ({"0", "1"} if e == 0 else {"1"})
        # One expert buffer per model chunk with MoE layers: pipeline rank 0's chunk 0 holds dense layer 0.
        assert {k.split("/")[1] for k in state if k.startswith("1/") and k.count("/") > 1} == \
            ({"0"} if p == 0 else {"0", "1"})
        for key in [k for k in state if k.endswith("/param")]:
            n = int(state[key.replace("param", "numel_unpadded")])
            assert state[key].dtype == np.float32 and state[key].shape == (n,)
            assert state[key.replace("param", "exp_avg_sq")].min() >= 0
    main = inst.main[1, 1, 1]
    assert main["model1.output_layer.weight"].dtype == np.float32
    for key, bits in inst.files[1, 1, 1].items():  # the bf16 weights round the fp32 main parameters to nearest
        assert not is_parameter(key) or np.array_equal(bits, source_model_bits(main[key]))
    flat = inst.optimizer[1, 1, 0]["0/1/bfloat16,float32/param"]
    out = inst.main[1, 1, 0]["model1.output_layer.weight"]
    assert np.array_equal(flat[:out.size], out.ravel())  # the last registered parameter comes first


def source_model_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even to bfloat16, as uint16 bits (an independent check of the writer's rounding)."""
    bits = x.astype(np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def matched_main_params(inst) -> dict:
    """Another correct way in, with no layout knowledge: find each bf16 weight as the rounded copy
    of a run of fp32 values in its rank's optimizer buffers."""
    out = {}
    for (t, p, e), tensors in inst.files.items():
        states = {**inst.optimizer[t, p, 0], **inst.optimizer[t, p, e]}
        buffers = [v for k, v in states.items() if k.endswith("/param")]
        out[t, p, e] = {k: v for k, v in tensors.items() if k.endswith("expert_bias")}  # fp32 as saved
        for name, bits in ((k, v) for k, v in tensors.items() if is_parameter(k)):
            flat = bits.ravel()
            for buf in buffers:
                rounded = source_model_bits(buf)
                starts = np.flatnonzero(rounded[: len(rounded) - flat.size + 1] == flat[0])
                hit = next((i for i in starts if np.array_equal(rounded[i:i + flat.size], flat)), None)
                if hit is not None:
                    out[t, p, e][name] = buf[hit:hit + flat.size].reshape(bits.shape)
                    break
            assert name in out[t, p, e], name
    return out


def test_weights_matched_against_the_optimizer_buffers_pass(save):
    inst = make_instance(8, 11)
    weights = convert_values(matched_main_params(inst), inst.args, inst.config)
    g = grade(save(weights), 8, 11)
    assert g.passed, g


@pytest.mark.parametrize("level", [8, 9])
def test_the_bf16_weights_are_not_the_original_model(level, save):
    inst = make_instance(level, 6)
    g = grade(save(convert(inst.files, inst.args, inst.config)), level, 6)  # a right level-7 conversion
    assert not g.passed and g.label == "main_params" and g.max_error > 100 * 1e-4


def test_level_9_shows_nothing_to_check_against(tmp_path):
    write_workspace(tmp_path, make_instance(9, 0))
    assert not (tmp_path / "reference.npz").exists() and not (tmp_path / "source_model.py").exists()
    prompt = build_prompt(9, 40)
    assert "- No reference.npz and no source_model.py" in prompt and prompt.count("reference.npz") == 1


def test_a_tie_in_routing_is_never_compared():
    inst = make_instance(7, 2)
    original, rng = inst.original(), np.random.default_rng(0)
    tokens = np.arange(32)
    drawn = original_logits(original, tokens, rng)
    margins = []
    source_model.forward(original, drawn[0], margins)
    assert min(margins) >= ROUTING_MARGIN
    for files in original.files.values():  # every router row the same and no bias: every token at a tie
        for key in [k for k in files if k.endswith(("router.weight", "router.expert_bias"))]:
            files[key] = np.repeat(files[key][:1], len(files[key]), axis=0)
    assert original_logits(original, tokens, rng) is None


@pytest.mark.parametrize("level", [7, 8])
def test_every_graded_sequence_is_drawn_clear_of_ties_over_many_instances(level):
    for seed in range(15):
        inst = make_instance(level, seed)
        original, rng = inst.original(), np.random.default_rng([seed, 5])
        assert all(original_logits(original, t, rng) for t in token_sequences(inst.args["vocab_size"], rng)), seed


def test_an_instance_with_no_clear_sequence_is_ungradable_not_a_crash(save, monkeypatch):
    def all_ties(level: int, seed: int):  # every router row the same: every token at a tie, whatever the order
        inst = make_instance(level, seed)
        for files in inst.files.values():
            for key in [k for k in files if k.endswith(("router.weight", "router.expert_bias"))]:
                files[key] = np.repeat(files[key][:1], len(files[key]), axis=0)
        return inst
    import grader
    monkeypatch.setattr(grader, "make_instance", all_ties)
    g = grader.grade_in_process(save(reference(7, 0)), 7, 0)  # in this process, where the patch holds
    assert (g.passed, g.label, g.max_error) == (False, "ungradable", None)


def test_graded_sequences_cover_every_token_clear_of_ties():
    inst = make_instance(7, 3)
    original, rng = inst.original(), np.random.default_rng(1)
    drawn = [original_logits(original, t, rng) for t in token_sequences(inst.args["vocab_size"], rng)]
    assert all(d is not None for d in drawn)
    assert set(np.concatenate([t for t, _ in drawn]).tolist()) == set(range(inst.args["vocab_size"]))


def test_reference_logits_cover_every_token_and_are_the_originals(tmp_path):
    inst = make_instance(7, 4)
    write_workspace(tmp_path, inst)
    with np.load(tmp_path / "reference.npz") as f:
        tokens, logits = f["tokens"], f["logits"]
    assert set(tokens.ravel().tolist()) == set(range(inst.args["vocab_size"]))
    assert np.allclose(source_model.forward(inst.original(), tokens[0]), logits[0], atol=1e-12)


@pytest.mark.soak  # long: python -m pytest -m soak (.ci/run runs it)
@pytest.mark.parametrize("level", [7, 8, 10])
@pytest.mark.parametrize("start", range(0, 50, 10))
def test_float32_reference_passes_on_fifty_instances(level, start, save):
    for seed in range(start, start + 10):
        weights = {k: v.astype(np.float32) for k, v in reference(level, seed).items()}
        g = grade(save(weights), level, seed)
        assert g.passed, (seed, g)


@pytest.mark.soak  # long: python -m pytest -m soak (.ci/run runs it)
def test_float32_reference_passes_on_twenty_draws_of_sequences(save):
    """Files that differ only in an ignored key are graded on different sequences."""
    for seed in (100, 101, 102):
        weights = {k: v.astype(np.float32) for k, v in reference(7, seed).items()}
        for nonce in range(20):
            g = grade(save({**weights, "nonce": np.array([nonce])}), 7, seed)
            assert g.passed, (seed, nonce, g)
