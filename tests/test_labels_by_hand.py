"""Each known mistake, made by hand on the reference conversion's tensors, gets its label from the grader.

The diagnosis names a mistake by replaying conversions.convert(..., mistake=M). These wrong files are built
without that code: each edit below states the mistake in terms of the runtime's tensors, so a replay that
drifted from what its label means would no longer name the file.
"""
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pytest
from conftest import reference
from test_deep_levels import source_model_bits

from conversions import MISTAKES, convert
from data.source_model import bf16_to_float as decode_bf16
from grader import grade
from instances import Instance, make_instance

Weights = dict[str, np.ndarray]
NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight", "q_norm.weight", "k_norm.weight")


def round_bf16(x: np.ndarray) -> np.ndarray:
    """To the nearest bfloat16 (ties to even), as the bf16 weights were rounded from the fp32 ones."""
    return decode_bf16(source_model_bits(x))


def layer_keys(w: Weights, suffixes: str | tuple[str, ...]) -> list[str]:
    return [k for k in w if k.startswith("model.layers.") and k.endswith(suffixes)]


def norm_keys(w: Weights) -> list[str]:
    """The norms the runtime applies as w (or 1 + w), the gated DeltaNet norm aside."""
    return ["model.norm.weight", *layer_keys(w, NORMS)]


def moe_layers(w: Weights) -> list[str]:
    return [k.removesuffix("gate.weight") for k in layer_keys(w, "mlp.gate.weight")]


def routed_experts(w: Weights, inst: Instance) -> list[str]:
    return [f"{p}experts.{g}." for p in moe_layers(w) for g in range(inst.args["num_experts"])]


def sqrt_hidden(inst: Instance) -> float:
    return float(np.sqrt(inst.args["hidden_size"]))


def routing_scale(inst: Instance) -> float:
    """What the reference folds into each routed expert's down_proj: the scale the runtime does not apply."""
    return (inst.args["moe_router_topk_scaling_factor"] or 1.0) / inst.config.get("routed_scaling_factor", 1.0)


# Rotary layout: Megatron's (interleaved pairs or halves) against the runtime's, over the first rot dims of a head.

def to_halves(d: int, rot: int) -> np.ndarray:
    """Row order that takes interleaved pairs (2i, 2i+1) to halves (i, i + rot/2), the rest in place."""
    return np.concatenate([np.arange(0, rot, 2), np.arange(1, rot, 2), np.arange(rot, d)])


def reference_rope_order(inst: Instance, rot: int) -> np.ndarray:
    """The row order the reference gives each q/k head: none where both sides share a layout."""
    d, interleaved = inst.args["kv_channels"], inst.args["rotary_interleaved"]
    if interleaved == inst.config["rope_interleave"]:
        return np.arange(d)
    return to_halves(d, rot) if interleaved else np.argsort(to_halves(d, rot))


def rot_dims(inst: Instance) -> int:
    return int(inst.args["kv_channels"] * inst.args["rotary_percent"])


def reorder_heads(w: Weights, suffixes: tuple[str, ...], order: np.ndarray) -> None:
    """Reorder the rows within every head of the tensors named by suffixes (weights, biases, or q/k norms)."""
    d = len(order)
    for k in layer_keys(w, suffixes):
        w[k] = w[k].reshape(-1, d, *w[k].shape[1:])[:, order].reshape(w[k].shape)


QK = ("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias", "q_norm.weight", "k_norm.weight")


def undo_reference_rope(w: Weights, inst: Instance, suffixes: tuple[str, ...]) -> None:
    reorder_heads(w, suffixes, np.argsort(reference_rope_order(inst, rot_dims(inst))))


def rope_layout(w: Weights, inst: Instance) -> None:
    """The familiar interleaved -> halves step where the layouts match, and no step where they differ."""
    if inst.args["rotary_interleaved"] == inst.config["rope_interleave"]:
        reorder_heads(w, QK, to_halves(inst.args["kv_channels"], rot_dims(inst)))
    else:
        undo_reference_rope(w, inst, QK)


def partial_rotary(w: Weights, inst: Instance) -> None:
    """The layouts swapped over the whole head, not only the rotated dims."""
    undo_reference_rope(w, inst, QK)
    reorder_heads(w, QK, reference_rope_order(inst, inst.args["kv_channels"]))


def qk_norm(w: Weights, inst: Instance) -> None:
    undo_reference_rope(w, inst, ("q_norm.weight", "k_norm.weight"))


def qkv_bias(w: Weights, inst: Instance) -> None:
    undo_reference_rope(w, inst, ("q_proj.bias", "k_proj.bias"))


# Attention's fused layout, embeddings and norms.

def bf16_decode(w: Weights, inst: Instance) -> None:
    """Every weight's bf16 bit pattern read as an integer, not decoded."""
    for k, v in w.items():
        w[k] = (v.astype(np.float32).view(np.uint32) >> 16).astype(np.float64)


def qkv_split(w: Weights, inst: Instance) -> None:
    """Megatron's per-group [q heads, k, v] rows read as all q, then all k, then all v."""
    groups, d = inst.args["num_query_groups"], inst.args["kv_channels"]
    for p in (k.removesuffix("q_proj.weight") for k in layer_keys(w, "q_proj.weight")):
        for kind in ("weight", "bias")[: 1 + inst.args["add_qkv_bias"]]:
            q, k, v = (w[f"{p}{x}_proj.{kind}"] for x in "qkv")
            fused = np.concatenate([np.concatenate([a, b, c]) for a, b, c in
                                    zip(np.split(q, groups), np.split(k, groups), np.split(v, groups))])
            w[f"{p}q_proj.{kind}"], w[f"{p}k_proj.{kind}"], w[f"{p}v_proj.{kind}"] = \
                np.split(fused, [len(q), len(q) + groups * d])


def untied_output(w: Weights, inst: Instance) -> None:
    """lm_head taken from the (unscaled) input embedding."""
    scale = sqrt_hidden(inst) if inst.config["scale_embeddings"] else 1.0
    w["lm_head.weight"] = w["model.embed_tokens.weight"] * scale


def embed_scale(w: Weights, inst: Instance) -> None:
    """The embedding divided by sqrt(hidden) for a runtime that does not multiply, or not for one that does."""
    factor = sqrt_hidden(inst) if inst.config["scale_embeddings"] else 1 / sqrt_hidden(inst)
    w["model.embed_tokens.weight"] = w["model.embed_tokens.weight"] * factor


def shift_norms(w: Weights, by: float) -> None:
    for k in norm_keys(w):
        w[k] = w[k] + by


def zero_centered_norm(w: Weights, inst: Instance) -> None:
    """Megatron's zero-centred gamma (which applies 1 + w) misread: +1 added where it is not, or left out."""
    shift_norms(w, -1.0 if inst.args["layernorm_zero_centered_gamma"] else 1.0)


def norm_offset(w: Weights, inst: Instance) -> None:
    """The runtime's norm_weight_offset (it applies 1 + w) misread: 1 taken off where it should not be, or kept."""
    shift_norms(w, 1.0 if inst.config["norm_weight_offset"] else -1.0)


def vocab_padding(w: Weights, inst: Instance) -> None:
    """Each vocab shard cut to ceil(vocab / tp) rows, as if the padding were spread over the ranks."""
    V, tp = inst.args["vocab_size"], inst.args["tensor_model_parallel_size"]
    scale = sqrt_hidden(inst) if inst.config["scale_embeddings"] else 1.0
    untied = inst.args["untie_embeddings_and_output_weights"]
    for name, source, divide in (("model.embed_tokens.weight", "embedding.word_embeddings.weight", scale),
                                 ("lm_head.weight", "output_layer.weight" if untied else "embedding.word_embeddings.weight", 1.0)):
        shards = [decode_bf16(inst.files[r, 0, 0][source]) for r in range(tp)]
        w[name] = np.concatenate([s[: -(-V // tp)] for s in shards])[:V] / divide


def renumber_layers(w: Weights, order: list[int]) -> None:
    """Layer i of the result holds layer order[i]'s tensors."""
    old = dict(w)
    for k in [k for k in w if k.startswith("model.layers.")]:
        del w[k]
    for i, j in enumerate(order):
        w |= {k.replace(f"model.layers.{j}.", f"model.layers.{i}.", 1): v
              for k, v in old.items() if k.startswith(f"model.layers.{j}.")}


def vpp_layer_order(w: Weights, inst: Instance) -> None:
    """Model chunks taken rank-major: with pp = vpp = 2 and one layer per chunk, layers 0, 2, 1, 3."""
    assert inst.args["num_layers"] == 4 and inst.args["pipeline_model_parallel_size"] == 2
    renumber_layers(w, [0, 2, 1, 3])


# MLPs and experts.

def gate_up_order(w: Weights, inst: Instance) -> None:
    """gate_proj and up_proj swapped in every dense MLP, shared expert and routed expert."""
    for gate in layer_keys(w, "gate_proj.weight"):
        up = gate.replace("gate_proj", "up_proj")
        w[gate], w[up] = w[up], w[gate]


def ranks_joined_first(w: Weights, p: str, tp: int) -> None:
    """Each tensor rank's fc1 rows [gate_r; up_r] joined across ranks, then halved into gate and up."""
    gate, up = w[p + "gate_proj.weight"], w[p + "up_proj.weight"]
    fc1 = np.concatenate([np.concatenate([g, u]) for g, u in zip(np.split(gate, tp), np.split(up, tp))])
    w[p + "gate_proj.weight"], w[p + "up_proj.weight"] = np.split(fc1, 2)


def tp_fc1_merge(w: Weights, inst: Instance) -> None:
    for gate in layer_keys(w, ("mlp.gate_proj.weight", "mlp.shared_expert.gate_proj.weight")):
        ranks_joined_first(w, gate.removesuffix("gate_proj.weight"), inst.args["tensor_model_parallel_size"])


def expert_tp_merge(w: Weights, inst: Instance) -> None:
    for p in routed_experts(w, inst):
        ranks_joined_first(w, p, inst.args["tensor_model_parallel_size"])


def expert_id(w: Weights, inst: Instance) -> None:
    """Local expert i of expert rank e taken as global expert i * ep + e, not e * local + i."""
    E, ep = inst.args["num_experts"], inst.args["expert_model_parallel_size"]
    old = dict(w)
    for p in moe_layers(w):
        for e in range(ep):
            for i in range(E // ep):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    w[f"{p}experts.{i * ep + e}.{proj}.weight"] = old[f"{p}experts.{e * (E // ep) + i}.{proj}.weight"]


def grouped_gemm_layout(w: Weights, inst: Instance) -> None:
    """Legacy GroupedMLP's weight1 (hidden, local * 2f) cut into column blocks per expert, not viewed as
    (local, hidden, 2f): every rank's fc1 of its local experts, rebuilt as that rank saved it."""
    E, ep, tp, H = (inst.args[k] for k in ("num_experts", "expert_model_parallel_size", "tensor_model_parallel_size",
                                           "hidden_size"))
    local = E // ep
    for p in moe_layers(w):
        for e in range(ep):
            names = [f"{p}experts.{e * local + i}." for i in range(local)]
            split = {x + proj: np.split(w[x + proj + ".weight"], tp) for x in names for proj in ("gate_proj", "up_proj")}
            for r in range(tp):
                fc1 = [np.concatenate([split[x + "gate_proj"][r], split[x + "up_proj"][r]]) for x in names]
                weight1 = np.stack([f.T for f in fc1]).reshape(H, -1)
                for x, block in zip(names, np.split(weight1, local, axis=1)):
                    split[x + "gate_proj"][r], split[x + "up_proj"][r] = np.split(block.T, 2)
            for key, shards in split.items():
                w[key + ".weight"] = np.concatenate(shards)


def expert_orientation(w: Weights, inst: Instance) -> None:
    """Each rank's square gate, up and down blocks of every routed expert transposed."""
    tp = inst.args["tensor_model_parallel_size"]
    for p in routed_experts(w, inst):
        for proj, axis in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            k = f"{p}{proj}.weight"
            w[k] = np.concatenate([b.T for b in np.split(w[k], tp, axis=axis)], axis=axis)


def router_scaling(w: Weights, inst: Instance) -> None:
    """The top-k scaling factor folded into the routed experts where the runtime applies it, or not where it does not."""
    factor = inst.args["moe_router_topk_scaling_factor"]
    by = factor if inst.config.get("routed_scaling_factor", 1.0) == factor else 1 / factor
    for p in routed_experts(w, inst):
        w[p + "down_proj.weight"] = w[p + "down_proj.weight"] * by


def shared_expert_scaling(w: Weights, inst: Instance) -> None:
    """The routed experts' scale folded into the shared expert too."""
    for p in moe_layers(w):
        w[p + "shared_expert.down_proj.weight"] = w[p + "shared_expert.down_proj.weight"] * routing_scale(inst)


def expert_bias(w: Weights, inst: Instance) -> None:
    for k in layer_keys(w, "e_score_correction_bias"):
        w[k] = np.zeros_like(w[k])


# The distributed optimizer's fp32 weights.

def main_params(w: Weights, inst: Instance) -> None:
    """The bf16 weights, not the fp32 main parameters: each Megatron value rounded, then transformed as before
    (norm offsets, the embedding scale, the routing scale). The router's expert_bias is fp32 in either."""
    norm_shift = inst.args["layernorm_zero_centered_gamma"] - inst.config["norm_weight_offset"]
    undone = dict.fromkeys(norm_keys(w), (norm_shift, 1.0)) | dict.fromkeys(
        [p + "down_proj.weight" for p in routed_experts(w, inst)], (0.0, routing_scale(inst)))
    if inst.config["scale_embeddings"]:
        undone["model.embed_tokens.weight"] = (0.0, 1 / sqrt_hidden(inst))
    for k in w:
        if not k.endswith("e_score_correction_bias"):
            shift, scale = undone.get(k, (0.0, 1.0))
            w[k] = round_bf16((w[k] - shift) / scale) * scale + shift


def optimizer_chain(w: Weights, inst: Instance) -> None:
    """Every expert rank's experts read from expert rank 0's optimizer state, whose buffers have the same
    layout: each expert rank's local experts get expert rank 0's."""
    E, ep = inst.args["num_experts"], inst.args["expert_model_parallel_size"]
    old = dict(w)
    for p in moe_layers(w):
        for g in range(E // ep, E):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                w[f"{p}experts.{g}.{proj}.weight"] = old[f"{p}experts.{g % (E // ep)}.{proj}.weight"]


def starts(sizes: dict[str, int], forward: bool = False, align: int = 64) -> dict[str, int]:
    """Where a grad buffer holds each parameter, given {name: size} in named_parameters order: taken in
    reverse (forward: in order), each start rounded up to `align` elements."""
    out, end = {}, 0
    for name in list(sizes)[:: 1 if forward else -1]:
        out[name] = -(-end // align) * align
        end = out[name] + sizes[name]
    return out


def linear_proj_last(names: list[str]) -> list[str]:
    """named_parameters as if each attention registered linear_proj after linear_qkv and the q/k norms."""
    out = [n for n in names if not n.endswith("linear_proj.weight")]
    for n in names:
        if n.endswith("linear_proj.weight"):
            attention = n.removesuffix("linear_proj.weight")
            out.insert(max(i for i, m in enumerate(out) if m.startswith(attention)) + 1, n)
    return out


def misread_buffers(w: Weights, inst: Instance, layout: Callable[[dict[str, int]], dict[str, int]]) -> None:
    """The reference conversion of the fp32 weights read from the distributed optimizer's flat buffers where
    `layout` puts them. Per rank, per optimizer (dense, expert), one buffer per model chunk that has such
    parameters (the bf16 tensors, in saved order); only expert rank 0 holds the dense optimizer."""
    values = {}
    for (t, p, e), tensors in inst.files.items():
        values[t, p, e] = {k: decode_bf16(v) if v.dtype == np.uint16 else v for k, v in tensors.items() if v.dtype != np.uint8}
        for index, expert in enumerate((False, True)):
            chunks = [{k: v.size for k, v in tensors.items() if k.startswith(f"model{c}.") and v.dtype == np.uint16
                       and (".experts." in k) == expert} for c in range(inst.args["virtual_pipeline_model_parallel_size"])]
            for buffer, sizes in enumerate(sizes for sizes in chunks if sizes):
                flat = inst.optimizer[t, p, e if expert else 0][f"{index}/{buffer}/bfloat16,float32/param"]
                flat = np.concatenate([flat, np.zeros(sum(sizes.values()))])  # a wrong layout may read past the end
                for k, start in layout(sizes).items():
                    values[t, p, e][k] = flat[start:start + sizes[k]].reshape(tensors[k].shape)
    w |= convert(values, inst.args, inst.config)


def buffer_order(w: Weights, inst: Instance) -> None:
    misread_buffers(w, inst, lambda sizes: starts(sizes, forward=True))


def param_alignment(w: Weights, inst: Instance) -> None:
    misread_buffers(w, inst, lambda sizes: starts(sizes, align=1))


def registration_order(w: Weights, inst: Instance) -> None:
    misread_buffers(w, inst, lambda sizes: starts({n: sizes[n] for n in linear_proj_last(list(sizes))}))


# Gated DeltaNet layers and the hybrid's attention.

def gated_norm_offset(w: Weights, inst: Instance) -> None:
    """Megatron's out_norm applies 1 + w under zero-centred gamma: the 1 left out of the runtime's gated norm."""
    for k in layer_keys(w, "linear_attn.norm.weight"):
        w[k] = w[k] - 1.0


def output_gate_layout(w: Weights, inst: Instance) -> None:
    """q_proj as all queries then all gates, not each head's [query; gate]."""
    heads, d = inst.args["num_attention_heads"], inst.args["kv_channels"]
    for k in layer_keys(w, ("q_proj.weight", "q_proj.bias")):
        w[k] = w[k].reshape(heads, 2, d, *w[k].shape[1:]).swapaxes(0, 1).reshape(w[k].shape)


def layer_pattern(w: Weights, inst: Instance) -> None:
    """Full attention put where i % freq == 0, not (i + 1) % freq == 0: with 4 layers, the last layer first."""
    assert inst.args["num_layers"] == inst.args["linear_attention_freq"] == 4
    renumber_layers(w, [3, 0, 1, 2])


def gdn_decay_split(w: Weights, inst: Instance) -> None:
    """A_log and dt_bias (split by value head across ranks) taken from rank 0 for every rank."""
    tp = inst.args["tensor_model_parallel_size"]
    for k in layer_keys(w, ("linear_attn.A_log", "linear_attn.dt_bias")):
        w[k] = np.tile(np.split(w[k], tp)[0], tp)


def conv_channels(w: Weights, inst: Instance) -> None:
    """conv1d's channels joined rank by rank ([q_r, k_r, v_r] per rank), not section by section."""
    a, tp = inst.args, inst.args["tensor_model_parallel_size"]
    key = a["linear_num_key_heads"] * a["linear_key_head_dim"]
    for k in layer_keys(w, "linear_attn.conv1d.weight"):
        sections = [np.split(s, tp) for s in np.split(w[k], [key, 2 * key])]  # q, k, v
        w[k] = np.concatenate([s[r] for r in range(tp) for s in sections])


def qkvz_sections(w: Weights, p: str, inst: Instance) -> list[np.ndarray]:
    """The runtime's per-key-head in_proj rows ungrouped into Megatron's sections [q, k, v, z, b, a]."""
    a, H = inst.args, inst.args["hidden_size"]
    nk, r = a["linear_num_key_heads"], a["linear_num_value_heads"] // a["linear_num_key_heads"]
    dk, dv = a["linear_key_head_dim"], a["linear_value_head_dim"]
    qkvz = np.split(w[p + "in_proj_qkvz.weight"].reshape(nk, -1, H), np.cumsum([dk, dk, r * dv]), axis=1)
    ba = np.split(w[p + "in_proj_ba.weight"].reshape(nk, 2 * r, H), 2, axis=1)
    return [x.reshape(-1, H) for x in qkvz + ba]


def grouped(sections: list[np.ndarray], inst: Instance) -> tuple[np.ndarray, np.ndarray]:
    """Sections [q, k, v, z, b, a] -> the runtime's in_proj_qkvz and in_proj_ba, grouped per key head."""
    nk, H = inst.args["linear_num_key_heads"], inst.args["hidden_size"]
    per_head = [x.reshape(nk, -1, H) for x in sections]
    return np.concatenate(per_head[:4], axis=1).reshape(-1, H), np.concatenate(per_head[4:], axis=1).reshape(-1, H)


def qkvz_grouping(w: Weights, inst: Instance) -> None:
    """in_proj left in Megatron's sections, not grouped per key head."""
    for p in (k.removesuffix("in_proj_qkvz.weight") for k in layer_keys(w, "linear_attn.in_proj_qkvz.weight")):
        sections = qkvz_sections(w, p, inst)
        w[p + "in_proj_qkvz.weight"], w[p + "in_proj_ba.weight"] = np.concatenate(sections[:4]), np.concatenate(sections[4:])


def gdn_tp_merge(w: Weights, inst: Instance) -> None:
    """in_proj's rank tensors (each [q_r, k_r, v_r, z_r, b_r, a_r]) joined first, then split as if unsharded."""
    tp = inst.args["tensor_model_parallel_size"]
    for p in (k.removesuffix("in_proj_qkvz.weight") for k in layer_keys(w, "linear_attn.in_proj_qkvz.weight")):
        sections = qkvz_sections(w, p, inst)
        joined = np.concatenate([np.split(s, tp)[r] for r in range(tp) for s in sections])
        wrong = np.split(joined, np.cumsum([len(s) for s in sections])[:-1])
        w[p + "in_proj_qkvz.weight"], w[p + "in_proj_ba.weight"] = grouped(wrong, inst)


class Case(NamedTuple):
    edit: Callable[[Weights, Instance], None]
    level: int
    when: Callable[[dict, dict], bool]  # (args, config) of an instance where the mistake is in play


def always(a: dict, c: dict) -> bool:
    return True


def layouts_match(a: dict, c: dict) -> bool:
    return a["rotary_interleaved"] == c["rope_interleave"]


CASES = {
    "bf16_decode": Case(bf16_decode, 1, always),
    "qkv_split": Case(qkv_split, 1, lambda a, c: a["num_query_groups"] > 1),  # one group: the split agrees
    "gate_up_order": Case(gate_up_order, 7, always),
    "untied_output": Case(untied_output, 1, lambda a, c: a["untie_embeddings_and_output_weights"]),
    "rope_layout/matching": Case(rope_layout, 2, layouts_match),
    "rope_layout/differing": Case(rope_layout, 2, lambda a, c: not layouts_match(a, c)),
    "rope_layout/biases_and_norms": Case(rope_layout, 3, lambda a, c: a["qk_layernorm"] and a["add_qkv_bias"]
                                         and a["rotary_percent"] < 1),
    "partial_rotary": Case(partial_rotary, 3, lambda a, c: a["rotary_percent"] < 1 and not layouts_match(a, c)),
    "qk_norm": Case(qk_norm, 3, lambda a, c: a["qk_layernorm"] and not layouts_match(a, c)),
    "qkv_bias": Case(qkv_bias, 3, lambda a, c: a["add_qkv_bias"] and not layouts_match(a, c)),
    "zero_centered_norm/on": Case(zero_centered_norm, 3, lambda a, c: a["layernorm_zero_centered_gamma"]),
    "zero_centered_norm/off": Case(zero_centered_norm, 3, lambda a, c: not a["layernorm_zero_centered_gamma"]),
    # Where exactly one of the two offsets is on, misreading either shifts the norms the same way: the label is
    # then the earlier zero_centered_norm's, so norm_offset is in play where both or neither is on.
    "norm_offset/on": Case(norm_offset, 3, lambda a, c: a["layernorm_zero_centered_gamma"] and c["norm_weight_offset"]),
    "norm_offset/off": Case(norm_offset, 3, lambda a, c: not (a["layernorm_zero_centered_gamma"] or c["norm_weight_offset"])),
    "embed_scale/on": Case(embed_scale, 3, lambda a, c: c["scale_embeddings"]),
    "embed_scale/off": Case(embed_scale, 3, lambda a, c: not c["scale_embeddings"]),
    "tp_fc1_merge": Case(tp_fc1_merge, 7, always),
    "vocab_padding": Case(vocab_padding, 4, lambda a, c: a["untie_embeddings_and_output_weights"]),
    "vpp_layer_order": Case(vpp_layer_order, 6, always),
    "expert_id": Case(expert_id, 7, always),
    "grouped_gemm_layout": Case(grouped_gemm_layout, 7, lambda a, c: a["moe_use_legacy_grouped_gemm"]),
    "expert_orientation": Case(expert_orientation, 7, always),
    "expert_orientation/legacy": Case(expert_orientation, 7, lambda a, c: a["moe_use_legacy_grouped_gemm"]),
    "expert_tp_merge": Case(expert_tp_merge, 7, always),
    "router_scaling/runtime_applies": Case(router_scaling, 7, lambda a, c: a["moe_router_topk_scaling_factor"] is not None
                                           and c.get("routed_scaling_factor") == a["moe_router_topk_scaling_factor"]),
    "router_scaling/folded": Case(router_scaling, 7, lambda a, c: a["moe_router_topk_scaling_factor"] is not None
                                  and c.get("routed_scaling_factor", 1.0) == 1.0),
    "shared_expert_scaling": Case(shared_expert_scaling, 7, lambda a, c: a["moe_router_topk_scaling_factor"] is not None
                                  and c.get("routed_scaling_factor", 1.0) == 1.0),
    "expert_bias": Case(expert_bias, 7, lambda a, c: a["moe_router_enable_expert_bias"]),
    "main_params": Case(main_params, 8, always),
    "buffer_order": Case(buffer_order, 8, always),
    "param_alignment": Case(param_alignment, 8, always),
    "registration_order": Case(registration_order, 8, always),
    "optimizer_chain": Case(optimizer_chain, 8, always),
    "gated_norm_offset": Case(gated_norm_offset, 10, lambda a, c: a["layernorm_zero_centered_gamma"]),
    "output_gate_layout": Case(output_gate_layout, 10, lambda a, c: a["attention_output_gate"]),
    "layer_pattern": Case(layer_pattern, 10, always),
    "gdn_decay_split": Case(gdn_decay_split, 10, always),
    "conv_channels": Case(conv_channels, 10, always),
    "qkvz_grouping": Case(qkvz_grouping, 10, always),
    "gdn_tp_merge": Case(gdn_tp_merge, 10, always),
}


def first_seed(level: int, when: Callable[[dict, dict], bool]) -> int:
    for seed in range(50):
        inst = make_instance(level, seed)
        if when(inst.args, inst.config):
            return seed
    raise AssertionError(f"no level-{level} instance in seeds 0-49 fits")


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_mistake_made_by_hand_gets_its_label(case, save):
    label, (edit, level, when) = case.split("/")[0], CASES[case]
    seed = first_seed(level, when)
    inst, wrong = make_instance(level, seed), reference(level, seed)
    edit(wrong, inst)
    g = grade(save(wrong), level, seed)
    assert not g.passed and g.label == label, (level, seed, g)


@pytest.mark.parametrize("level", [8, 10])
def test_the_buffer_layout_stated_here_reads_the_reference(level):
    """The misread_buffers above, given the right layout, reads what the reference conversion reads."""
    inst, right = make_instance(level, 0), reference(level, 0)
    read = dict(right)
    misread_buffers(read, inst, starts)
    assert all(np.array_equal(read[k], right[k]) for k in right)


def test_every_label_has_a_case_made_by_hand():
    assert {case.split("/")[0] for case in CASES} == set(MISTAKES)
