"""The original model: a Megatron-Core GPT (Transformer Engine layer names) in numpy.

Each rank's .npz holds that rank's share of the tensor-parallel model, and forward
computes with the shares as the ranks do together.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Checkpoint:
    args: dict  # megatron_args.json
    ranks: list[dict[str, np.ndarray]]  # one dict of float64 tensors per TP rank


def bf16_to_float(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float64 values."""
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def load_checkpoint(directory: str | Path) -> Checkpoint:
    directory = Path(directory)
    args = json.loads((directory / "megatron_args.json").read_text())
    ranks = []
    for rank in range(args["tensor_model_parallel_size"]):
        with np.load(directory / "checkpoint" / f"mp_rank_{rank:02d}.npz") as f:
            ranks.append({k: bf16_to_float(f[k]) for k in f.files})
    return Checkpoint(args, ranks)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


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
    """One rank's share of self-attention: (T, hidden)."""
    T = h.shape[0]
    tp = args["tensor_model_parallel_size"]
    groups = args["num_query_groups"] // tp
    per_group = args["num_attention_heads"] // args["num_query_groups"]
    d = args["kv_channels"]
    qkv = h @ w[p + "linear_qkv.weight"].T
    if args["add_qkv_bias"]:
        qkv = qkv + w[p + "linear_qkv.bias"]
    qkv = qkv.reshape(T, groups, per_group + 2, d)
    q = qkv[:, :, :per_group].reshape(T, groups * per_group, d)
    k, v = qkv[:, :, per_group], qkv[:, :, per_group + 1]  # (T, groups, d)
    if args["qk_layernorm"]:
        q = rms_norm(q, w[p + "q_layernorm.weight"], args["norm_epsilon"])
        k = rms_norm(k, w[p + "k_layernorm.weight"], args["norm_epsilon"])
    q, k = apply_rotary(q, args), apply_rotary(k, args)
    k, v = np.repeat(k, per_group, axis=1), np.repeat(v, per_group, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
    scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    context = np.einsum("hqk,khd->qhd", probs, v).reshape(T, -1)
    return context @ w[p + "linear_proj.weight"].T


def mlp(h: np.ndarray, w: dict, p: str) -> np.ndarray:
    """One rank's share of the SwiGLU MLP: (T, hidden)."""
    x = h @ w[p + "linear_fc1.weight"].T
    gate, up = np.split(x, 2, axis=-1)
    return (gate / (1 + np.exp(-gate)) * up) @ w[p + "linear_fc2.weight"].T


def embed(tokens: np.ndarray, ranks: list[dict]) -> np.ndarray:
    out = 0.0
    start = 0
    for w in ranks:
        table = w["embedding.word_embeddings.weight"]
        local = tokens - start
        mine = (local >= 0) & (local < len(table))
        out = out + np.where(mine[:, None], table[np.clip(local, 0, len(table) - 1)], 0.0)
        start += len(table)
    return out


def forward(ckpt: Checkpoint, tokens: np.ndarray) -> np.ndarray:
    """tokens: (T,) int -> logits (T, vocab_size) float64."""
    args, ranks = ckpt.args, ckpt.ranks
    eps = args["norm_epsilon"]
    x = embed(np.asarray(tokens), ranks)
    for i in range(args["num_layers"]):
        p = f"decoder.layers.{i}."
        h = rms_norm(x, ranks[0][p + "self_attention.linear_qkv.layer_norm_weight"], eps)
        x = x + sum(attention(h, w, p + "self_attention.", args) for w in ranks)
        h = rms_norm(x, ranks[0][p + "mlp.linear_fc1.layer_norm_weight"], eps)
        x = x + sum(mlp(h, w, p + "mlp.") for w in ranks)
    x = rms_norm(x, ranks[0]["decoder.final_layernorm.weight"], eps)
    output_key = "output_layer.weight" if args["untie_embeddings_and_output_weights"] \
        else "embedding.word_embeddings.weight"
    logits = np.concatenate([x @ w[output_key].T for w in ranks], axis=-1)
    return logits[:, : args["vocab_size"]]
