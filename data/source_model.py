"""The original model: a Megatron-Core GPT (Transformer Engine layer names) in numpy.

Each checkpoint file holds one rank's share of the model, and forward computes with the
shares as the ranks do together: tensor-parallel shares are summed or concatenated,
pipeline stages run in turn, and each expert-parallel rank applies its own experts.
"""
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:  # the project's package, or a workspace that holds both files side by side
    from data.source_gdn import gated_delta_net
except ImportError:
    from source_gdn import gated_delta_net


@dataclass
class Checkpoint:
    args: dict  # megatron_args.json
    files: dict[tuple[int, int, int], dict[str, np.ndarray]]  # (tensor, pipeline, expert) rank -> float64 tensors


def bf16_to_float(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float64 values."""
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def ranks(args: dict) -> list[tuple[int, int, int]]:
    """Every (tensor, pipeline, expert) parallel rank that saved a file."""
    return list(itertools.product(range(args["tensor_model_parallel_size"]),
                                  range(args["pipeline_model_parallel_size"]),
                                  range(args["expert_model_parallel_size"])))


def rank_file(args: dict, tp: int, pp: int, ep: int, iteration: int, name: str = "model_optim_rng.npz") -> str:
    """A rank's file below the save directory: pipeline and expert ranks are named only when in use
    (get_checkpoint_name in megatron/training/checkpointing.py)."""
    rank = f"mp_rank_{tp:02d}"
    if args["pipeline_model_parallel_size"] > 1:
        rank += f"_{pp:03d}"
    if args["expert_model_parallel_size"] > 1:
        rank += f"_{ep:03d}"
    return f"iter_{iteration:07d}/{rank}/{name}"


def load_checkpoint(directory: str | Path) -> Checkpoint:
    directory = Path(directory)
    args = json.loads((directory / "megatron_args.json").read_text())
    saved = directory / "checkpoint"
    iteration = int((saved / "latest_checkpointed_iteration.txt").read_text())
    files = {}
    for rank in ranks(args):
        with np.load(saved / rank_file(args, *rank, iteration)) as f:
            # bf16 parameters as bits, fp32 buffers (the router's expert_bias) as they are, not _extra_state
            files[rank] = {k: bf16_to_float(f[k]) if f[k].dtype == np.uint16 else f[k].astype(np.float64)
                           for k in f.files if f[k].dtype != np.uint8}
    return Checkpoint(args, files)


def chunks(args: dict) -> list[tuple[int, str]]:
    """(pipeline rank, key prefix) of each model chunk, in the order the forward pass runs them."""
    vpp = args["virtual_pipeline_model_parallel_size"]
    return [(p, f"model{c}." if vpp else "") for c in range(vpp or 1)
            for p in range(args["pipeline_model_parallel_size"])]


def norm(x: np.ndarray, w: dict, key: str, args: dict) -> np.ndarray:
    """Megatron's `normalization` (TE): RMSNorm, or LayerNorm with its bias saved beside the weight
    (`...layer_norm_bias` of a fused norm, `.bias` of a TENorm); x (1 + w) under zero-centred gamma."""
    scale = 1.0 + w[key] if args["layernorm_zero_centered_gamma"] else w[key]
    if args["normalization"] == "RMSNorm":
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + args["layernorm_epsilon"]) * scale
    x = x - x.mean(axis=-1, keepdims=True)
    bias = w[key.removesuffix("weight") + "bias"]
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + args["layernorm_epsilon"]) * scale + bias


def rotate_half(x: np.ndarray, interleaved: bool) -> np.ndarray:
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return np.stack((-x2, x1), axis=-1).reshape(x.shape)
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate((-x2, x1), axis=-1)


def apply_rotary(x: np.ndarray, args: dict) -> np.ndarray:
    """x: (T, heads, kv_channels); rotates the first rotary_percent of each head."""
    dim = int(args["kv_channels"] * args["rotary_percent"])
    inv_freq = 1.0 / args["rotary_base"] ** (np.arange(0, dim, 2) / dim)
    freqs = np.outer(np.arange(x.shape[0]), inv_freq)  # (T, dim/2)
    if args["rotary_interleaved"]:
        emb = np.repeat(freqs, 2, axis=-1)
    else:
        emb = np.concatenate((freqs, freqs), axis=-1)
    emb = emb[:, None, :]  # (T, 1, dim)
    rot, rest = x[..., :dim], x[..., dim:]
    rot = rot * np.cos(emb) + rotate_half(rot, args["rotary_interleaved"]) * np.sin(emb)
    return np.concatenate((rot, rest), axis=-1)


def attention(h: np.ndarray, w: dict, p: str, args: dict) -> np.ndarray:
    """One tensor-parallel rank's share of self-attention: (T, hidden)."""
    T = h.shape[0]
    groups = args["num_query_groups"] // args["tensor_model_parallel_size"]
    per_group = args["num_attention_heads"] // args["num_query_groups"]
    d, gated = args["kv_channels"], args["attention_output_gate"]
    qkv = h @ w[p + "linear_qkv.weight"].T
    if args["add_qkv_bias"]:
        qkv = qkv + w[p + "linear_qkv.bias"]
    qkv = qkv.reshape(T, groups, (1 + gated) * per_group + 2, d)  # per group: [q heads, gate heads if gated, k, v]
    q, gate = (qkv[:, :, i * per_group:(i + 1) * per_group].reshape(T, groups * per_group, d) for i in (0, gated))
    k, v = qkv[:, :, -2], qkv[:, :, -1]  # (T, groups, d)
    if args["qk_layernorm"]:
        q, k = norm(q, w, p + "q_layernorm.weight", args), norm(k, w, p + "k_layernorm.weight", args)
    q, k = apply_rotary(q, args), apply_rotary(k, args)
    k, v = np.repeat(k, per_group, axis=1), np.repeat(v, per_group, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
    scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    context = np.einsum("hqk,khd->qhd", probs, v)
    if gated:
        context = context / (1 + np.exp(-gate))
    return context.reshape(T, -1) @ w[p + "linear_proj.weight"].T


def linear_attention(args: dict, layer: int) -> bool:
    """Whether global layer `layer` is Gated DeltaNet: an int frequency N makes every N-th layer full
    attention, a list marks linear-attention layers with 1 (get_linear_attention_pattern)."""
    freq = args.get("linear_attention_freq")
    return bool(freq[layer]) if isinstance(freq, list) else bool(freq) and (layer + 1) % freq != 0


def swiglu(x: np.ndarray) -> np.ndarray:
    gate, up = np.split(x, 2, axis=-1)
    return gate / (1 + np.exp(-gate)) * up


def mlp(h: np.ndarray, w: dict, p: str) -> np.ndarray:
    """One tensor-parallel rank's share of a SwiGLU MLP: (T, hidden)."""
    return swiglu(h @ w[p + "linear_fc1.weight"].T) @ w[p + "linear_fc2.weight"].T


def route(logits: np.ndarray, args: dict, expert_bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the scores that choose the experts, the top-k experts, their weights) per token, as
    topk_routing_with_score_function (moe/moe_utils.py) computes them."""
    k = args["moe_router_topk"]

    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    sigmoid = args["moe_router_score_function"] == "sigmoid"  # which ignores moe_router_pre_softmax
    scores = 1 / (1 + np.exp(-logits)) if sigmoid else softmax(logits)
    # The bias only chooses, never weighs; a softmax ranks experts as their logits do.
    choose = (scores if expert_bias is None else scores + expert_bias) if sigmoid else logits
    top = np.argsort(-choose, axis=-1, kind="stable")[:, :k]
    if sigmoid:  # the chosen sigmoid scores, summing to 1 if there are several
        probs = np.take_along_axis(scores, top, axis=-1)
        probs = probs / probs.sum(axis=-1, keepdims=True) if k > 1 else probs
    elif args["moe_router_pre_softmax"]:  # the softmax over all experts, not renormalised
        probs = np.take_along_axis(scores, top, axis=-1)
    else:  # a softmax over the top-k logits
        probs = softmax(np.take_along_axis(logits, top, axis=-1))
    return choose, top, probs * (args["moe_router_topk_scaling_factor"] or 1.0)


def expert(w: dict, p: str, i: int, args: dict) -> tuple[np.ndarray, np.ndarray]:
    """Local expert i's fc1 and fc2 on one rank, [in, out], in the checkpoint's expert format:
    legacy GroupedMLP (raw views of weight1 and weight2), TEGroupedMLP (one weight per expert)
    or SequentialMLP (one MLP per expert); moe/experts.py."""
    if args["moe_grouped_gemm"] and args["moe_use_legacy_grouped_gemm"]:
        local, H = args["num_experts"] // args["expert_model_parallel_size"], args["hidden_size"]
        return w[p + "weight1"].reshape(local, H, -1)[i], w[p + "weight2"].reshape(local, -1, H)[i]
    fc = f"linear_fc{{}}.weight{i}" if args["moe_grouped_gemm"] else f"local_experts.{i}.linear_fc{{}}.weight"
    return w[p + fc.format(1)].T, w[p + fc.format(2)].T


def moe(h: np.ndarray, shards: list[list[dict]], p: str, args: dict, margins: list | None) -> np.ndarray:
    """A mixture-of-experts MLP; shards[e][t] is the file of expert rank e, tensor rank t.

    Expert-tensor rank equals tensor rank: both rank generators put tp first
    ('tp-cp-ep-dp-pp' in megatron/core/parallel_state.py) and the sizes are equal.
    """
    router, k = shards[0][0], args["moe_router_topk"]
    choose, top, probs = route(h @ router[p + "router.weight"].T, args, router.get(p + "router.expert_bias"))
    if margins is not None:  # how close each token came to a different choice of experts
        ranked = -np.sort(-choose, axis=-1)
        margins.append(float(np.min(ranked[:, k - 1] - ranked[:, k])))
    local = args["num_experts"] // args["expert_model_parallel_size"]
    out = 0.0
    for ep, files in enumerate(shards):
        for i in range(local):
            weight = np.sum(probs * (top == ep * local + i), axis=-1, keepdims=True)
            for w in files:  # each expert-tensor rank's share
                w1, w2 = expert(w, p + "experts.", i, args)
                out = out + weight * (swiglu(h @ w1) @ w2)
    shared = sum(mlp(h, w, p + "shared_experts.") for w in shards[0])
    if args["moe_shared_expert_gate"]:
        shared = shared / (1 + np.exp(-h @ router[p + "shared_experts.gate_weight"].T))
    return out + shared


def vocab_parallel(tokens: np.ndarray, tables: list[np.ndarray]) -> np.ndarray:
    """Embedding lookup with the vocabulary split across tensor-parallel ranks."""
    out, start = 0.0, 0
    for table in tables:
        local = tokens - start
        mine = (local >= 0) & (local < len(table))
        out = out + np.where(mine[:, None], table[np.clip(local, 0, len(table) - 1)], 0.0)
        start += len(table)
    return out


def forward(ckpt: Checkpoint, tokens: np.ndarray, margins: list | None = None) -> np.ndarray:
    """tokens: (T,) int -> logits (T, vocab_size) float64; appends MoE routing margins to `margins`."""
    args, files = ckpt.args, ckpt.files
    tp, ep = args["tensor_model_parallel_size"], args["expert_model_parallel_size"]
    order = chunks(args)
    per_chunk = args["num_layers"] // len(order)
    (first, fp), (last, lp) = order[0], order[-1]
    x = vocab_parallel(np.asarray(tokens), [files[t, first, 0][fp + "embedding.word_embeddings.weight"]
                                            for t in range(tp)])
    number = 0  # global layer number, counted in execution order
    for stage, prefix in order:
        shards = [[files[t, stage, e] for t in range(tp)] for e in range(ep)]
        for i in range(per_chunk):
            p = f"{prefix}decoder.layers.{i}."
            w0, a = shards[0][0], p + "self_attention."
            if linear_attention(args, number):  # the input norm is fused into in_proj
                h = norm(x, w0, a + "in_proj.layer_norm_weight", args)
                x = x + sum(gated_delta_net(h, w, a, args, norm) for w in shards[0])
            else:
                h = norm(x, w0, a + "linear_qkv.layer_norm_weight", args)
                x = x + sum(attention(h, w, a, args) for w in shards[0])
            if args["num_experts"] and args["moe_layer_freq"][number]:
                x = x + moe(norm(x, w0, p + "pre_mlp_layernorm.weight", args), shards, p + "mlp.", args, margins)
            else:
                h = norm(x, w0, p + "mlp.linear_fc1.layer_norm_weight", args)
                x = x + sum(mlp(h, w, p + "mlp.") for w in shards[0])
            number += 1
    x = norm(x, files[0, last, 0], lp + "decoder.final_layernorm.weight", args)
    tied = not args["untie_embeddings_and_output_weights"] and args["pipeline_model_parallel_size"] == 1
    output = "embedding.word_embeddings.weight" if tied else "output_layer.weight"  # a last stage's own copy if tied
    logits = np.concatenate([x @ files[t, last, 0][lp + output].T for t in range(tp)], axis=-1)
    return logits[:, : args["vocab_size"]]
