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
            "norm_offset": 3, "embed_scale": 3, "tp_fc1_merge": 4, "vocab_padding": 4}


def convert(ranks: list[dict[str, np.ndarray]], args: dict, config: dict,
            mistake: str | None = None) -> dict[str, np.ndarray]:
    """Megatron TP ranks (uint16 bf16 bits) -> runtime weights (float64)."""
    if mistake is not None and mistake not in MISTAKES:
        raise ValueError(f"unknown mistake {mistake!r}")
    if mistake == "bf16_decode":
        ranks = [{k: v.astype(np.float64) for k, v in r.items()} for r in ranks]
    else:
        ranks = [{k: (v.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
                  for k, v in r.items()} for r in ranks]
    H, d, V = args["hidden_size"], args["kv_channels"], args["vocab_size"]
    heads, groups = args["num_attention_heads"], args["num_query_groups"]
    per_group, tp = heads // groups, len(ranks)

    def cat(key: str, axis: int = 0) -> np.ndarray:
        return np.concatenate([r[key] for r in ranks], axis=axis)

    def norm(w: np.ndarray) -> np.ndarray:
        return w - 1.0 if config["norm_weight_offset"] and mistake != "norm_offset" else w

    # Interleaved rotary pairs (2i, 2i+1) -> half-split pairs (i, i + rot/2), rotated dims only.
    rot = d if mistake == "partial_rotary" else int(d * args["rotary_percent"])
    rope = np.arange(d)
    if args["rotary_interleaved"] and mistake != "rope_permutation":
        rope = np.concatenate([np.arange(0, rot, 2), np.arange(1, rot, 2), np.arange(rot, d)])
    # Runtime head t = j * groups + g reads kv head t % groups; Megatron's head g * per_group + j reads g.
    order = np.arange(heads)
    if config["kv_head_sharing"] == "tile" and mistake != "kv_sharing":
        order = np.array([g * per_group + j for j in range(per_group) for g in range(groups)])

    def split_qkv(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Fused (groups * (per_group + 2) * d, ...) -> q (heads, d, ...), k and v (groups, d, ...)."""
        if mistake == "qkv_split":
            q, k, v = np.split(x, [heads * d, (heads + groups) * d])
            return q.reshape(heads, d, *x.shape[1:]), k.reshape(groups, d, *x.shape[1:]), v.reshape(groups, d, *x.shape[1:])
        x = x.reshape(groups, per_group + 2, d, *x.shape[1:])
        return x[:, :per_group].reshape(heads, d, *x.shape[3:]), x[:, per_group], x[:, per_group + 1]

    def q_k(q: np.ndarray, k: np.ndarray, permute: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Per-head tensors in Megatron order -> flattened runtime q and k."""
        perm = rope if permute else np.arange(d)
        return q[order][:, perm].reshape(-1, *q.shape[2:]), k[:, perm].reshape(-1, *k.shape[2:])

    out = {}
    for i in range(args["num_layers"]):
        p, t = f"decoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = split_qkv(cat(p + "self_attention.linear_qkv.weight"))
        out[t + "self_attn.q_proj.weight"], out[t + "self_attn.k_proj.weight"] = q_k(q, k)
        out[t + "self_attn.v_proj.weight"] = v.reshape(-1, H)
        if args["add_qkv_bias"]:
            q, k, v = split_qkv(cat(p + "self_attention.linear_qkv.bias"))
            out[t + "self_attn.q_proj.bias"], out[t + "self_attn.k_proj.bias"] = q_k(q, k, mistake != "qkv_bias")
            out[t + "self_attn.v_proj.bias"] = v.reshape(-1)
        if args["qk_layernorm"]:
            q = np.tile(ranks[0][p + "self_attention.q_layernorm.weight"], (heads, 1))
            k = ranks[0][p + "self_attention.k_layernorm.weight"][None]
            q, k = q_k(q, k, mistake != "qk_norm")
            out[t + "self_attn.q_norm.weight"], out[t + "self_attn.k_norm.weight"] = norm(q[:d]), norm(k)
        proj = cat(p + "self_attention.linear_proj.weight", axis=1).reshape(H, heads, d)
        out[t + "self_attn.o_proj.weight"] = proj[:, order].reshape(H, heads * d)
        if mistake == "tp_fc1_merge":
            gate, up = np.split(cat(p + "mlp.linear_fc1.weight"), 2)
        else:
            halves = [np.split(r[p + "mlp.linear_fc1.weight"], 2) for r in ranks]
            gate, up = (np.concatenate([h[j] for h in halves]) for j in (0, 1))
        if mistake == "gate_up_order":
            gate, up = up, gate
        out[t + "mlp.gate_proj.weight"], out[t + "mlp.up_proj.weight"] = gate, up
        out[t + "mlp.down_proj.weight"] = cat(p + "mlp.linear_fc2.weight", axis=1)
        out[t + "input_layernorm.weight"] = norm(ranks[0][p + "self_attention.linear_qkv.layer_norm_weight"])
        out[t + "post_attention_layernorm.weight"] = norm(ranks[0][p + "mlp.linear_fc1.layer_norm_weight"])
    if mistake == "vocab_padding":
        table = np.concatenate([r["embedding.word_embeddings.weight"][: -(-V // tp)] for r in ranks])[:V]
    else:
        table = cat("embedding.word_embeddings.weight")[:V]
    scale = np.sqrt(H) if config["scale_embeddings"] and mistake != "embed_scale" else 1.0
    out["model.embed_tokens.weight"] = table / scale
    out["lm_head.weight"] = table
    out["model.norm.weight"] = norm(ranks[0]["decoder.final_layernorm.weight"])
    return out


def convert_workspace(out_path: str, mistake: str | None = None, workspace: str = ".") -> None:
    """Read a task workspace, convert, and save the runtime checkpoint to out_path."""
    ws = Path(workspace)
    args = json.loads((ws / "megatron_args.json").read_text())
    config = json.loads((ws / "config.json").read_text())
    ranks = []
    for rank in range(args["tensor_model_parallel_size"]):
        with np.load(ws / "checkpoint" / f"mp_rank_{rank:02d}.npz") as f:
            ranks.append({k: f[k] for k in f.files})
    np.savez(out_path, **convert(ranks, args, config, mistake))
