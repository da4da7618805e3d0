"""The reference conversion, and the known wrong ones that each miss one convention.

Used by the tests, by `main.py --offline` (which sends this file's source to the sandbox)
and by the grader's diagnosis. It is never part of a workspace, so it depends on numpy only.
"""
import json
from pathlib import Path

import numpy as np

# Each wrong conversion, by grader label, and the first level whose conventions it misses.
MISTAKES = {"bf16_decode": 1, "qkv_split": 1, "gate_up_order": 1, "untied_output": 1, "rope_layout": 2,
            "partial_rotary": 3, "qk_norm": 3, "qkv_bias": 3, "zero_centered_norm": 3, "norm_offset": 3,
            "embed_scale": 3, "tp_fc1_merge": 4, "vocab_padding": 4, "vpp_layer_order": 6, "expert_id": 7,
            "grouped_gemm_layout": 7, "expert_orientation": 7, "expert_tp_merge": 7, "router_scaling": 7,
            "shared_expert_scaling": 7, "expert_bias": 7, "main_params": 8, "buffer_order": 8,
            "param_alignment": 8, "registration_order": 8, "optimizer_chain": 8, "gdn_tp_merge": 10,
            "qkvz_grouping": 10, "conv_channels": 10, "gdn_decay_split": 10, "gated_norm_offset": 10,
            "output_gate_layout": 10, "layer_pattern": 10}

Files = dict[tuple[int, int, int], dict[str, np.ndarray]]  # (tensor, pipeline, expert) rank -> tensors


def layer_files(files: Files, args: dict, mistake: str | None) -> tuple[list[list[list[dict]]], str, str]:
    """Per global layer, [expert rank][tensor rank] -> that layer's tensors with the layer prefix
    removed; and the prefixes of the first and the last model chunk."""
    tp, pp, ep = (args[k] for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                                    "expert_model_parallel_size"))
    vpp = args["virtual_pipeline_model_parallel_size"] or 1
    # Chunk c of pipeline rank p holds the layers from c * layers / vpp + p * layers / (pp * vpp)
    # (get_transformer_layer_offset): chunks run c-major, not rank-major.
    order = [(p, c) for p in range(pp) for c in range(vpp)] if mistake == "vpp_layer_order" else \
        [(p, c) for c in range(vpp) for p in range(pp)]
    prefix = (lambda c: f"model{c}.") if args["virtual_pipeline_model_parallel_size"] else (lambda c: "")
    layers = []
    for p, c in order:
        for i in range(args["num_layers"] // len(order)):
            key = f"{prefix(c)}decoder.layers.{i}."
            layers.append([[{k[len(key):]: v for k, v in files[t, p, e].items() if k.startswith(key)}
                            for t in range(tp)] for e in range(ep)])
    return layers, prefix(0), prefix(vpp - 1)


def buffer_layout(names: list[str], sizes: list[int], mistake: str | None = None) -> tuple[dict[str, int], int]:
    """Where a grad buffer of the distributed optimizer holds each parameter: ({name: start},
    numel_unpadded). `names` in registration order (named_parameters); the buffer takes them in
    reverse, each start aligned to 64 elements (DistributedOptimizer._compute_per_buffer_param_layout)."""
    order = list(zip(names, sizes))
    if mistake == "registration_order":  # forward order: linear_proj after linear_qkv and the q/k norms
        moved, held = [], None
        for name, size in order:
            if held and not name.startswith(held[0].removesuffix("linear_proj.weight")):
                moved, held = [*moved, held], None
            if name.endswith("linear_proj.weight"):
                held = (name, size)
            else:
                moved.append((name, size))
        order = moved + [held] * (held is not None)
    starts, end = {}, 0
    for name, size in (order if mistake == "buffer_order" else order[::-1]):
        starts[name] = end if mistake == "param_alignment" else -(-end // 64) * 64
        end = starts[name] + size
    return starts, end


def buffers(tensors: dict[str, np.ndarray], args: dict, expert: bool,
            mistake: str | None = None) -> list[tuple[dict[str, int], int]]:
    """One rank's dense (or expert) grad buffers, in optimizer order: one per model chunk that has
    such parameters (a chunk without them has none), each as buffer_layout gives it. Extra states
    are not parameters; expert weights set `allreduce = False` only under expert parallelism, and
    DDP puts such parameters in the expert buffer."""
    vpp, out = args["virtual_pipeline_model_parallel_size"], []
    for c in range(vpp or 1):
        names = [k for k in tensors if k.startswith(f"model{c}." if vpp else "") and is_parameter(k)
                 and (".experts." in k and args["expert_model_parallel_size"] > 1) == expert]
        if names:
            out.append(buffer_layout(names, [tensors[k].size for k in names], mistake))
    return out


def main_params(files: Files, optimizer: Files, args: dict, mistake: str | None) -> Files:
    """Each rank's fp32 main parameters, read from the distrib_optim states through the buffer layout."""
    out = {}
    for (t, p, e), tensors in files.items():
        out[t, p, e] = {}
        for index, expert in enumerate((False, True)):
            # Only expert rank 0's file holds the dense optimizer; each expert rank's holds its experts.
            state = optimizer[t, p, 0 if not expert or mistake == "optimizer_chain" else e]
            for buffer, (starts, numel) in enumerate(buffers(tensors, args, expert, mistake)):
                flat = state[f"{index}/{buffer}/bfloat16,float32/param"]
                flat = np.concatenate([flat, np.zeros(max(0, numel - flat.size))])  # a wrong layout may read past the end
                for k, start in starts.items():
                    out[t, p, e][k] = flat[start:start + tensors[k].size].reshape(tensors[k].shape)
    return out


def is_parameter(key: str) -> bool:
    """TE's _extra_state and the router's expert_bias buffer are saved beside the parameters but
    are none: no optimizer state, no place in a grad buffer."""
    return not key.endswith(("_extra_state", "expert_bias"))


# The mistakes made while reading the weights' values; the others are made in converting them.
READING_MISTAKES = {"bf16_decode", "main_params", "buffer_order", "param_alignment", "registration_order",
                    "optimizer_chain"}


def convert(files: Files, args: dict, config: dict, mistake: str | None = None,
            optimizer: Files | None = None) -> dict[str, np.ndarray]:
    """Megatron rank files (uint16 bf16 bits; with the distributed optimizer, also its saved
    states) -> runtime weights (float64)."""
    if mistake is not None and mistake not in MISTAKES:
        raise ValueError(f"unknown mistake {mistake!r}")
    return convert_values(read_values(files, args, optimizer, mistake), args, config, mistake)


def read_values(files: Files, args: dict, optimizer: Files | None, mistake: str | None = None) -> Files:
    """Each rank's weights as numbers: the fp32 main parameters if there is an optimizer state,
    else the decoded bf16 weights; fp32 buffers as saved. TE's _extra_state entries are no weights."""
    files = {r: {k: v for k, v in f.items() if not k.endswith("_extra_state")} for r, f in files.items()}
    if mistake == "bf16_decode":
        return {r: {k: v.astype(np.float64) for k, v in f.items()} for r, f in files.items()}
    decoded = {r: {k: (v.astype(np.uint32) << 16).view(np.float32).astype(np.float64) if v.dtype == np.uint16
                   else v.astype(np.float64) for k, v in f.items()} for r, f in files.items()}
    if optimizer and mistake != "main_params":
        return {r: decoded[r] | f for r, f in main_params(files, optimizer, args, mistake).items()}
    return decoded


# Drawn yes/no conventions, by the mistake that reads them the other way: (in megatron_args.json?, key).
FLAGS = {"zero_centered_norm": (True, "layernorm_zero_centered_gamma"),
         "untied_output": (True, "untie_embeddings_and_output_weights"),
         "expert_bias": (True, "moe_router_enable_expert_bias"), "norm_offset": (False, "norm_weight_offset"),
         "embed_scale": (False, "scale_embeddings")}


def flipped(args: dict, config: dict, mistake: str | None) -> tuple[dict, dict]:
    """The flags and runtime config as a converter that reads one drawn convention the other way
    sees them: the wrong conversion of that convention is the right one for this misreading."""
    if mistake in FLAGS:
        in_args, key = FLAGS[mistake]
        return (args | {key: not args[key]}, config) if in_args else (args, config | {key: not config[key]})
    if mistake == "rope_layout":  # the familiar interleaved -> halves step where the layouts match, none where not
        matching = args["rotary_interleaved"] == config["rope_interleave"]
        wrong_args, wrong_config = ({"rotary_interleaved": True}, {"rope_interleave": False}) if matching else \
            ({}, {"rope_interleave": args["rotary_interleaved"]})
        return args | wrong_args, config | wrong_config
    if mistake == "router_scaling":  # the factor taken as the runtime's own where it is not, or the reverse
        factor = args["moe_router_topk_scaling_factor"] or 1.0
        runtime_applies = config.get("routed_scaling_factor", 1.0) == factor
        return args, config | {"routed_scaling_factor": 1.0 if runtime_applies else factor}
    return args, config


def convert_values(files: Files, args: dict, config: dict, mistake: str | None = None) -> dict[str, np.ndarray]:
    """Each rank's original weights, as numbers -> runtime weights (float64)."""
    args, config = flipped(args, config, mistake)
    layers, first, last = layer_files(files, args, mistake)
    if mistake == "layer_pattern":  # full attention taken to sit where i % freq == 0, not (i + 1) % freq == 0
        full = [lay for lay in layers if "self_attention.linear_qkv.weight" in lay[0][0]]
        linear = [lay for lay in layers if "self_attention.linear_qkv.weight" not in lay[0][0]]
        layers = [(full if i % args["linear_attention_freq"] == 0 else linear).pop(0) for i in range(len(layers))]
    out = {}
    for i, shards in enumerate(layers):
        ranks, t = shards[0], f"model.layers.{i}."
        if "self_attention.in_proj.weight" in ranks[0]:
            out |= gated_delta_net(ranks, args, t + "linear_attn.", mistake)
            out |= norm(ranks[0], "self_attention.in_proj.layer_norm_", t + "input_layernorm.", args, config)
        else:
            out |= attention(ranks, args, config, t + "self_attn.", mistake)
            out |= norm(ranks[0], "self_attention.linear_qkv.layer_norm_", t + "input_layernorm.", args, config)
        if "mlp.router.weight" in ranks[0]:
            out |= moe(shards, args, config, t + "mlp.", mistake)
            out |= norm(ranks[0], "pre_mlp_layernorm.", t + "post_attention_layernorm.", args, config)
        else:
            out |= swiglu(ranks, "mlp.", t + "mlp.", mistake)
            out |= norm(ranks[0], "mlp.linear_fc1.layer_norm_", t + "post_attention_layernorm.", args, config)
    return out | embeddings(files, args, config, first, last, mistake)


def norm(w: dict, key: str, name: str, args: dict, config: dict) -> dict[str, np.ndarray]:
    """Megatron's norm weight (the multiplier, or its offset from 1 under zero-centred gamma) ->
    the runtime's (the multiplier, or its offset from 1 with norm_weight_offset); a LayerNorm's bias as is."""
    weight = w[key + "weight"] + args["layernorm_zero_centered_gamma"] - config["norm_weight_offset"]
    return {name + "weight": weight} | ({name + "bias": w[key + "bias"]} if args["normalization"] == "LayerNorm" else {})


def rope_order(args: dict, config: dict, mistake: str | None) -> np.ndarray:
    """Row order within a head that turns Megatron's rotary layout into the runtime's: interleaved
    pairs (2i, 2i+1) <-> halves (i, i + rot/2) over the rotated dims, the rest in place."""
    d = args["kv_channels"]
    rot = d if mistake == "partial_rotary" else int(d * args["rotary_percent"])
    to_halves = np.concatenate([np.arange(0, rot, 2), np.arange(1, rot, 2), np.arange(rot, d)])
    if args["rotary_interleaved"] == config["rope_interleave"]:
        return np.arange(d)
    return to_halves if args["rotary_interleaved"] else np.argsort(to_halves)


def split_qkv(x: np.ndarray, args: dict, mistake: str | None) -> tuple[np.ndarray, ...]:
    """Fused, per kv group [q heads, their output gates if gated, k, v] -> q and gate (heads, d, ...),
    k and v (groups, d, ...)."""
    heads, groups, d, gated = (args[k] for k in ("num_attention_heads", "num_query_groups", "kv_channels",
                                                  "attention_output_gate"))
    per_group = heads // groups
    if mistake == "qkv_split":
        q, gate, k, v = np.split(x, np.cumsum([heads * d, gated * heads * d, groups * d]))
        return tuple(t.reshape(-1, d, *x.shape[1:]) for t in (q, gate, k, v))
    x = x.reshape(groups, (1 + gated) * per_group + 2, d, *x.shape[1:])
    q, gate = (x[:, i * per_group:(i + 1) * per_group].reshape(heads, d, *x.shape[3:]) for i in (0, gated))
    return q, gate, x[:, -2], x[:, -1]


def attention(ranks: list[dict], args: dict, config: dict, t: str, mistake: str | None) -> dict[str, np.ndarray]:
    """One layer's self-attention from its tensor-parallel shards: q, k and v with the rotary dims in
    the runtime's order (and q/k biases and norms with them), q_proj per head [query; gate] if gated."""
    H, d, p = args["hidden_size"], args["kv_channels"], "self_attention."
    rope = rope_order(args, config, mistake)

    def q_proj(q: np.ndarray, gate: np.ndarray) -> np.ndarray:
        if not args["attention_output_gate"]:
            return q.reshape(-1, *q.shape[2:])
        if mistake == "output_gate_layout":  # all queries, then all gates
            return np.concatenate([q, gate]).reshape(-1, *q.shape[2:])
        return np.concatenate([q, gate], axis=1).reshape(-1, *q.shape[2:])

    def qkv(name: str, permuted: bool) -> dict[str, np.ndarray]:
        q, gate, k, v = split_qkv(np.concatenate([r[p + "linear_qkv." + name] for r in ranks]), args, mistake)
        order = rope if permuted else np.arange(d)
        return {t + "q_proj." + name: q_proj(q[:, order], gate), t + "k_proj." + name: k[:, order].reshape(-1, *k.shape[2:]),
                t + "v_proj." + name: v.reshape(-1, *v.shape[2:])}

    out = qkv("weight", True) | (qkv("bias", mistake != "qkv_bias") if args["add_qkv_bias"] else {})
    if args["qk_layernorm"]:
        order = rope if mistake != "qk_norm" else np.arange(d)
        for x in "qk":
            out |= {k: v[order] for k, v in norm(ranks[0], f"{p}{x}_layernorm.", f"{t}{x}_norm.", args, config).items()}
    out[t + "o_proj.weight"] = np.concatenate([r[p + "linear_proj.weight"] for r in ranks], axis=1).reshape(H, -1)
    return out


def gate_up(fc1: list[np.ndarray], mistake: str | None, merge_mistake: str) -> tuple[np.ndarray, np.ndarray]:
    """Each tensor rank's fc1 rows [gate; up] -> the full gate and up projections."""
    if mistake == merge_mistake:  # the ranks' rows joined first, then halved
        gate, up = np.split(np.concatenate(fc1), 2)
    else:
        halves = [np.split(w, 2) for w in fc1]
        gate, up = (np.concatenate([h[j] for h in halves]) for j in (0, 1))
    return (up, gate) if mistake == "gate_up_order" else (gate, up)


def swiglu(ranks: list[dict], p: str, t: str, mistake: str | None, scale: float = 1.0) -> dict[str, np.ndarray]:
    gate, up = gate_up([r[p + "linear_fc1.weight"] for r in ranks], mistake, "tp_fc1_merge")
    down = np.concatenate([r[p + "linear_fc2.weight"] for r in ranks], axis=1)
    return {t + "gate_proj.weight": gate, t + "up_proj.weight": up, t + "down_proj.weight": down * scale}


def expert(w: dict, i: int, args: dict, mistake: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Local expert i's fc1 [gate; up] and fc2 on one rank, [out, in], from the checkpoint's format:
    legacy GroupedMLP weight1/weight2 read through view(local, hidden, -1) and view(local, -1, hidden)
    as [in, out]; TEGroupedMLP's weight{i} and SequentialMLP's local_experts.{i} as they are."""
    p, H = "mlp.experts.", args["hidden_size"]
    if args["moe_grouped_gemm"] and args["moe_use_legacy_grouped_gemm"]:
        local, w1 = args["num_experts"] // args["expert_model_parallel_size"], w[p + "weight1"]
        fc1 = w1[:, i * w1.shape[1] // local:(i + 1) * w1.shape[1] // local] if mistake == "grouped_gemm_layout" \
            else w1.reshape(local, H, -1)[i]
        fc1, fc2 = fc1.T, w[p + "weight2"].reshape(local, -1, H)[i].T
    else:
        fc = f"linear_fc{{}}.weight{i}" if args["moe_grouped_gemm"] else f"local_experts.{i}.linear_fc{{}}.weight"
        fc1, fc2 = w[p + fc.format(1)], w[p + fc.format(2)]
    if mistake == "expert_orientation":  # each square block read in the other orientation
        return np.concatenate([x.T for x in np.split(fc1, 2)]), fc2.T
    return fc1, fc2


def moe(shards: list[list[dict]], args: dict, config: dict, t: str, mistake: str | None) -> dict[str, np.ndarray]:
    """Router, routed experts and shared expert of one layer; shards[e][r] is expert rank e, tensor rank r.
    A routing scale the runtime does not apply itself is folded into every routed expert's down_proj."""
    router, ep, E = shards[0][0], args["expert_model_parallel_size"], args["num_experts"]
    scale = (args["moe_router_topk_scaling_factor"] or 1.0) / config.get("routed_scaling_factor", 1.0)
    out = {t + "gate.weight": router["mlp.router.weight"]}
    if config["scoring_func"] == "sigmoid":  # DeepSeek-V3's correction bias is Megatron's expert_bias, else none
        out[t + "gate.e_score_correction_bias"] = router["mlp.router.expert_bias"] \
            if args["moe_router_enable_expert_bias"] else np.zeros(E)
    for e, ranks in enumerate(shards):
        for i in range(E // ep):
            g = i * ep + e if mistake == "expert_id" else e * (E // ep) + i  # expert rank e holds e * local ...
            fc1, fc2 = zip(*(expert(r, i, args, mistake) for r in ranks))
            gate, up = gate_up(list(fc1), mistake, "expert_tp_merge")
            x = t + f"experts.{g}."
            out |= {x + "gate_proj.weight": gate, x + "up_proj.weight": up,
                    x + "down_proj.weight": np.concatenate(fc2, axis=1) * scale}
    out |= swiglu(shards[0], "mlp.shared_experts.", t + "shared_expert.", mistake,
                  scale if mistake == "shared_expert_scaling" else 1.0)
    if args["moe_shared_expert_gate"]:
        out[t + "shared_expert_gate.weight"] = router["mlp.shared_experts.gate_weight"]
    return out


def embeddings(files: Files, args: dict, config: dict, first: str, last: str, mistake: str | None) -> dict:
    """The input embedding (divided by the runtime's sqrt(hidden) scale, if it has one), lm_head and the
    final norm; vocab-parallel tables lose their padding, which sits at the end of the last rank."""
    V, tp, pp = args["vocab_size"], args["tensor_model_parallel_size"], args["pipeline_model_parallel_size"]

    def vocab(name: str, stage: int, prefix: str) -> np.ndarray:
        shards = [files[r, stage, 0][prefix + name] for r in range(tp)]
        if mistake == "vocab_padding":
            return np.concatenate([s[: -(-V // tp)] for s in shards])[:V]
        return np.concatenate(shards)[:V]

    table = vocab("embedding.word_embeddings.weight", 0, first)
    scale = np.sqrt(args["hidden_size"]) if config["scale_embeddings"] else 1.0
    untied = args["untie_embeddings_and_output_weights"]
    return {"model.embed_tokens.weight": table / scale,
            "lm_head.weight": vocab("output_layer.weight", pp - 1, last) if untied else table,
            **norm(files[0, pp - 1, 0], last + "decoder.final_layernorm.", "model.norm.", args, config)}


def gated_delta_net(ranks: list[dict], args: dict, a_: str, mistake: str | None) -> dict[str, np.ndarray]:
    """One Gated DeltaNet layer's tensor-parallel shards -> the runtime's linear_attn tensors."""
    p, tp, H = "self_attention.", len(ranks), args["hidden_size"]
    nk, nv, dk, dv = (args[f"linear_{k}"] for k in ("num_key_heads", "num_value_heads", "key_head_dim", "value_head_dim"))
    r = nv // nk

    def merge(name: str, sizes: list[int], blocks: bool = True) -> list[np.ndarray]:
        """Each rank holds its own share of every section: gather section j from every rank. With
        blocks=False, the ranks' tensors are joined first and split as if unsharded."""
        if not blocks:
            return np.split(np.concatenate([w[p + name] for w in ranks]), np.cumsum(sizes)[:-1])
        parts = [np.split(w[p + name], np.cumsum(sizes)[:-1] // tp) for w in ranks]
        return [np.concatenate([part[j] for part in parts]) for j in range(len(sizes))]

    q, k, v, z, b, a = merge("in_proj.weight", [nk * dk, nk * dk, nv * dv, nv * dv, nv, nv], mistake != "gdn_tp_merge")
    if mistake == "qkvz_grouping":  # left as Megatron's sections, not grouped per key head
        qkvz, ba = np.concatenate([q, k, v, z]), np.concatenate([b, a])
    else:  # per key head: [q, k, its value heads' v, their z] and [their b, their a]
        qkvz = np.concatenate([x.reshape(nk, -1, H) for x in (q, k, v, z)], axis=1).reshape(-1, H)
        ba = np.concatenate([b.reshape(nk, r, H), a.reshape(nk, r, H)], axis=1).reshape(-1, H)
    conv = np.concatenate([w[p + "conv1d.weight"] for w in ranks]) if mistake == "conv_channels" else \
        np.concatenate(merge("conv1d.weight", [nk * dk, nk * dk, nv * dv]))

    def per_head(name: str) -> np.ndarray:  # split by value head across ranks, like beta and alpha
        return np.concatenate([ranks[0 if mistake == "gdn_decay_split" else i][p + name] for i in range(tp)])

    # Megatron's out_norm applies 1 + w under zero-centred gamma; the runtime's gated norm applies w.
    offset = args["layernorm_zero_centered_gamma"] and mistake != "gated_norm_offset"
    return {a_ + "in_proj_qkvz.weight": qkvz, a_ + "in_proj_ba.weight": ba, a_ + "conv1d.weight": conv,
            a_ + "A_log": per_head("A_log"), a_ + "dt_bias": per_head("dt_bias"),
            a_ + "norm.weight": ranks[0][p + "out_norm.weight"] + offset,
            a_ + "out_proj.weight": np.concatenate([w[p + "out_proj.weight"] for w in ranks], axis=1)}


def read_files(ws: Path, args: dict, name: str = "model_optim_rng.npz") -> Files:
    """checkpoint/iter_NNNNNNN/mp_rank_TT[_PPP][_EEE]/<name> -> {(tensor, pipeline, expert) rank: tensors}."""
    iteration = int((ws / "checkpoint" / "latest_checkpointed_iteration.txt").read_text())
    files = {}
    for path in sorted((ws / "checkpoint" / f"iter_{iteration:07d}").glob(f"mp_rank_*/{name}")):
        numbers = [int(n) for n in path.parent.name.split("_")[2:]]
        pp = numbers.pop(1) if args["pipeline_model_parallel_size"] > 1 else 0
        ep = numbers.pop(1) if args["expert_model_parallel_size"] > 1 else 0
        with np.load(path) as f:
            files[numbers[0], pp, ep] = {k: f[k] for k in f.files}
    return files


def convert_workspace(out_path: str, mistake: str | None = None, workspace: str = ".") -> None:
    """Read a task workspace, convert, and save the runtime checkpoint to out_path."""
    ws = Path(workspace)
    args = json.loads((ws / "megatron_args.json").read_text())
    config = json.loads((ws / "config.json").read_text())
    optimizer = read_files(ws, args, "distrib_optim.npz") if args["use_distributed_optimizer"] else None
    np.savez(out_path, **convert(read_files(ws, args), args, config, mistake, optimizer))
