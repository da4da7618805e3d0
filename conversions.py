"""The reference conversion, and the known wrong ones that each miss one convention.

Used by the tests, by `main.py --offline` (which sends this file's source to the sandbox)
and by the grader's diagnosis. It is never part of a workspace, so it depends on numpy only.
"""
import json
from pathlib import Path

import numpy as np

# Each wrong conversion, by grader label, and the first level whose conventions it misses.
MISTAKES = {"bf16_decode": 1, "qkv_split": 1, "gate_up_order": 1, "rope_permutation": 2,
            "kv_sharing": 2, "partial_rotary": 3, "qk_norm": 3, "qkv_bias": 3,
            "norm_offset": 3, "embed_scale": 3, "tp_fc1_merge": 4, "vocab_padding": 4,
            "vpp_layer_order": 6, "zero_centered_norm": 6, "untied_output": 6, "expert_id": 7,
            "grouped_gemm_layout": 7, "expert_tp_merge": 7, "router_scaling": 7, "shared_expert_scaling": 7,
            "main_params": 8, "buffer_order": 8, "param_alignment": 8, "registration_order": 8,
            "optimizer_chain": 8, "gdn_tp_merge": 10, "qkvz_grouping": 10, "conv_channels": 10,
            "gdn_decay_split": 10, "gated_norm_offset": 10, "output_gate_layout": 10, "layer_pattern": 10}

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
        names = [k for k in tensors if k.startswith(f"model{c}." if vpp else "") and not k.endswith("_extra_state")
                 and (".experts.weight" in k and args["expert_model_parallel_size"] > 1) == expert]
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
    else the decoded bf16 weights. TE's _extra_state entries are not weights."""
    files = {r: {k: v for k, v in f.items() if not k.endswith("_extra_state")} for r, f in files.items()}
    if mistake == "bf16_decode":
        return {r: {k: v.astype(np.float64) for k, v in f.items()} for r, f in files.items()}
    if optimizer and mistake != "main_params":
        return main_params(files, optimizer, args, mistake)
    return {r: {k: (v.astype(np.uint32) << 16).view(np.float32).astype(np.float64) for k, v in f.items()}
            for r, f in files.items()}


def convert_values(files: Files, args: dict, config: dict, mistake: str | None = None) -> dict[str, np.ndarray]:
    """Each rank's original weights, as numbers -> runtime weights (float64)."""
    files = {r: {k: v.astype(np.float64, copy=False) for k, v in f.items()} for r, f in files.items()}
    H, d, V = args["hidden_size"], args["kv_channels"], args["vocab_size"]
    heads, groups = args["num_attention_heads"], args["num_query_groups"]
    tp, pp, per_group = args["tensor_model_parallel_size"], args["pipeline_model_parallel_size"], heads // groups

    def norm(w: np.ndarray) -> np.ndarray:
        """Megatron's norm weight -> the runtime's: the multiplier, or its offset from 1."""
        scale = 1.0 + w if args["layernorm_zero_centered_gamma"] and mistake != "zero_centered_norm" else w
        return scale - 1.0 if config["norm_weight_offset"] and mistake != "norm_offset" else scale

    # Interleaved rotary pairs (2i, 2i+1) -> half-split pairs (i, i + rot/2), rotated dims only.
    rot = d if mistake == "partial_rotary" else int(d * args["rotary_percent"])
    rope = np.arange(d)
    if args["rotary_interleaved"] and mistake != "rope_permutation":
        rope = np.concatenate([np.arange(0, rot, 2), np.arange(1, rot, 2), np.arange(rot, d)])
    # Runtime head t = j * groups + g reads kv head t % groups; Megatron's head g * per_group + j reads g.
    order = np.arange(heads)
    if config["kv_head_sharing"] == "tile" and mistake != "kv_sharing":
        order = np.array([g * per_group + j for j in range(per_group) for g in range(groups)])

    gated = args["attention_output_gate"]

    def split_qkv(x: np.ndarray) -> tuple[np.ndarray, ...]:
        """Fused, per group [q heads, their gates if gated, k, v] -> q and gate (heads, d, ...), k and v
        (groups, d, ...)."""
        if mistake == "qkv_split":
            q, gate, k, v = np.split(x, np.cumsum([heads * d, gated * heads * d, groups * d]))
            return tuple(t.reshape(-1, d, *x.shape[1:]) for t in (q, gate, k, v))
        x = x.reshape(groups, (1 + gated) * per_group + 2, d, *x.shape[1:])
        q, gate = (x[:, i * per_group:(i + 1) * per_group].reshape(heads, d, *x.shape[3:]) for i in (0, gated))
        return q, gate, x[:, -2], x[:, -1]

    def with_gate(q: np.ndarray, gate: np.ndarray) -> np.ndarray:
        """Runtime q_proj rows: per head [query; gate] when gated (runtime head order)."""
        if not gated:
            return q
        q, gate = q.reshape(heads, d, *q.shape[1:]), gate[order]
        if mistake == "output_gate_layout":  # all queries, then all gates
            return np.concatenate([q, gate]).reshape(-1, *q.shape[2:])
        return np.concatenate([q, gate], axis=1).reshape(-1, *q.shape[2:])

    def q_k(q: np.ndarray, k: np.ndarray, permute: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Per-head tensors in Megatron order -> flattened runtime q and k."""
        perm = rope if permute else np.arange(d)
        return q[order][:, perm].reshape(-1, *q.shape[2:]), k[:, perm].reshape(-1, *k.shape[2:])

    def gate_up(fc1: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Each tensor rank's fc1 rows [gate; up] -> the full gate and up projections."""
        if mistake == "tp_fc1_merge":
            gate, up = np.split(np.concatenate(fc1), 2)
        else:
            halves = [np.split(w, 2) for w in fc1]
            gate, up = (np.concatenate([h[j] for h in halves]) for j in (0, 1))
        return (up, gate) if mistake == "gate_up_order" else (gate, up)

    def swiglu(t: str, ranks: list[dict], p: str, scale: float = 1.0) -> dict[str, np.ndarray]:
        gate, up = gate_up([r[p + "linear_fc1.weight"] for r in ranks])
        down = np.concatenate([r[p + "linear_fc2.weight"] for r in ranks], axis=1)
        return {t + "gate_proj.weight": gate, t + "up_proj.weight": up, t + "down_proj.weight": down * scale}

    layers, first, last = layer_files(files, args, mistake)
    if mistake == "layer_pattern":  # full attention taken to sit where i % freq == 0, not (i + 1) % freq == 0
        full = [lay for lay in layers if "self_attention.linear_qkv.weight" in lay[0][0]]
        linear = [lay for lay in layers if "self_attention.linear_qkv.weight" not in lay[0][0]]
        layers = [(full if i % args["linear_attention_freq"] == 0 else linear).pop(0) for i in range(len(layers))]
    out = {}
    for i, shards in enumerate(layers):
        ranks, t = shards[0], f"model.layers.{i}."
        if "self_attention.in_proj.weight" in ranks[0]:
            out |= gated_delta_net(ranks, args, t, mistake)
            out[t + "input_layernorm.weight"] = norm(ranks[0]["self_attention.in_proj.layer_norm_weight"])
        else:
            q, gate, k, v = split_qkv(np.concatenate([r["self_attention.linear_qkv.weight"] for r in ranks]))
            q, out[t + "self_attn.k_proj.weight"] = q_k(q, k)
            out[t + "self_attn.q_proj.weight"], out[t + "self_attn.v_proj.weight"] = with_gate(q, gate), v.reshape(-1, H)
            if args["add_qkv_bias"]:
                q, gate, k, v = split_qkv(np.concatenate([r["self_attention.linear_qkv.bias"] for r in ranks]))
                q, out[t + "self_attn.k_proj.bias"] = q_k(q, k, mistake != "qkv_bias")
                out[t + "self_attn.q_proj.bias"], out[t + "self_attn.v_proj.bias"] = with_gate(q, gate), v.reshape(-1)
            if args["qk_layernorm"]:
                q = np.tile(ranks[0]["self_attention.q_layernorm.weight"], (heads, 1))
                k = ranks[0]["self_attention.k_layernorm.weight"][None]
                q, k = q_k(q, k, mistake != "qk_norm")
                out[t + "self_attn.q_norm.weight"], out[t + "self_attn.k_norm.weight"] = norm(q[:d]), norm(k)
            proj = np.concatenate([r["self_attention.linear_proj.weight"] for r in ranks], axis=1).reshape(H, heads, d)
            out[t + "self_attn.o_proj.weight"] = proj[:, order].reshape(H, heads * d)
            out[t + "input_layernorm.weight"] = norm(ranks[0]["self_attention.linear_qkv.layer_norm_weight"])
        if "mlp.router.weight" in ranks[0]:
            out |= moe(shards, args, t + "mlp.", mistake)
            factor = args["moe_router_topk_scaling_factor"] if mistake == "shared_expert_scaling" else 1.0
            out |= swiglu(t + "mlp.shared_expert.", ranks, "mlp.shared_experts.", factor)
            out[t + "mlp.shared_expert_gate.weight"] = ranks[0]["mlp.shared_experts.gate_weight"]
            out[t + "post_attention_layernorm.weight"] = norm(ranks[0]["pre_mlp_layernorm.weight"])
        else:
            out |= swiglu(t + "mlp.", ranks, "mlp.")
            out[t + "post_attention_layernorm.weight"] = norm(ranks[0]["mlp.linear_fc1.layer_norm_weight"])

    def vocab(name: str, stage: int, prefix: str) -> np.ndarray:
        """A vocab-parallel table without its padding, which sits at the end of the last rank."""
        shards = [files[r, stage, 0][prefix + name] for r in range(tp)]
        if mistake == "vocab_padding":
            return np.concatenate([s[: -(-V // tp)] for s in shards])[:V]
        return np.concatenate(shards)[:V]

    table = vocab("embedding.word_embeddings.weight", 0, first)
    scale = np.sqrt(H) if config["scale_embeddings"] and mistake != "embed_scale" else 1.0
    out["model.embed_tokens.weight"] = table / scale
    untied = args["untie_embeddings_and_output_weights"] and mistake != "untied_output"
    out["lm_head.weight"] = vocab("output_layer.weight", pp - 1, last) if untied else table
    out["model.norm.weight"] = norm(files[0, pp - 1, 0][last + "decoder.final_layernorm.weight"])
    return out


def moe(shards: list[list[dict]], args: dict, t: str, mistake: str | None) -> dict[str, np.ndarray]:
    """Router and routed experts of one layer; shards[e][r] is expert rank e, tensor rank r."""
    H, ep = args["hidden_size"], args["expert_model_parallel_size"]
    local, f = args["num_experts"] // ep, args["moe_ffn_hidden_size"] // args["expert_tensor_parallel_size"]
    # The runtime renormalises the top-k weights to sum to 1; Megatron then multiplies by the factor.
    scale = 1.0 if mistake == "router_scaling" else args["moe_router_topk_scaling_factor"] or 1.0
    out = {t + "gate.weight": shards[0][0]["mlp.router.weight"]}
    for e, ranks in enumerate(shards):
        for i in range(local):
            g = i * ep + e if mistake == "expert_id" else e * local + i  # expert rank e holds e*local ...
            blocks = []  # per tensor rank: (hidden, 2f) = [gate | up] in [in, out] orientation
            for r in ranks:
                w1 = r["mlp.experts.weight1"]
                blocks.append(w1[:, i * 2 * f:(i + 1) * 2 * f] if mistake == "grouped_gemm_layout"
                              else w1.reshape(local, H, 2 * f)[i])
            if mistake == "expert_tp_merge":
                gate, up = np.split(np.concatenate(blocks, axis=1), 2, axis=1)
            else:
                gate, up = (np.concatenate([b[:, j * f:(j + 1) * f] for b in blocks], axis=1) for j in (0, 1))
            down = np.concatenate([r["mlp.experts.weight2"].reshape(local, f, H)[i] for r in ranks])
            p = t + f"experts.{g}."
            out |= {p + "gate_proj.weight": gate.T, p + "up_proj.weight": up.T, p + "down_proj.weight": down.T * scale}
    return out


def gated_delta_net(ranks: list[dict], args: dict, t: str, mistake: str | None) -> dict[str, np.ndarray]:
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
    offset = args["layernorm_zero_centered_gamma"] and mistake not in ("gated_norm_offset", "zero_centered_norm")
    a_ = t + "linear_attn."
    return {a_ + "in_proj_qkvz.weight": qkvz, a_ + "in_proj_ba.weight": ba, a_ + "conv1d.weight": conv,
            a_ + "A_log": per_head("A_log"), a_ + "dt_bias": per_head("dt_bias"),
            a_ + "norm.weight": ranks[0][p + "out_norm.weight"] + offset,
            a_ + "out_proj.weight": np.concatenate([w[p + "out_proj.weight"] for w in ranks], axis=1)}


def explain_failure(weights: dict[str, np.ndarray], reference: dict[str, np.ndarray], files: Files, args: dict,
            config: dict, optimizer: Files | None, level: int) -> tuple[str, str]:
    """(label, detail) for a failing submission: the known wrong conversion (first used at `level` or
    before) that gives every tensor where `weights` differ from `reference` and changes no other;
    "other" if none does, so that a label always says what happened."""
    def same(a: np.ndarray, b: np.ndarray | None) -> bool:  # None: a conversion that does not write that tensor
        return b is not None and a.shape == b.shape and (np.array_equal(a, b) or np.allclose(a, b, rtol=1e-3, atol=1e-6))

    differing = [k for k in reference if not same(weights[k], reference[k])]
    if not differing:
        return "other", "every tensor is within rtol 1e-3 of the reference conversion, yet the logits miss"
    values = read_values(files, args, optimizer)  # shared by the mistakes not made in reading
    for mistake in (m for m, first in MISTAKES.items() if first <= level):
        read = read_values(files, args, optimizer, mistake) if mistake in READING_MISTAKES else values
        wrong = convert_values(read, args, config, mistake)
        if all(same(weights[k], wrong.get(k)) for k in differing) and \
                all(same(reference[k], wrong.get(k)) for k in reference if k not in differing):
            return mistake, f"the {len(differing)} tensors that differ are those of a conversion that gets {mistake} wrong"
    return "other", (f"{len(differing)} tensors differ (first: {differing[0]}); no single known mistake gives them "
                     "all and only them")


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
