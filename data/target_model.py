"""The serving runtime: a decoder-only transformer in numpy, Hugging Face naming; with
`layer_types`, a Qwen3-Next-style hybrid of Gated DeltaNet and output-gated attention."""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Model:
    config: dict  # config.json
    weights: dict[str, np.ndarray]


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor the runtime reads for this config, with its shape."""
    H, d, inter, V = config["hidden_size"], config["head_dim"], config["intermediate_size"], config["vocab_size"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    gated = 2 if config.get("attn_output_gate") else 1  # q_proj then holds each head's query and gate
    norms = {f"{n}.{kind}": (H,) for n in ("input_layernorm", "post_attention_layernorm") for kind in norm_params(config)}
    attn = {"self_attn.q_proj.weight": (gated * q, H), "self_attn.k_proj.weight": (kv, H),
            "self_attn.v_proj.weight": (kv, H), "self_attn.o_proj.weight": (H, q)}
    if config["qkv_bias"]:
        attn |= {"self_attn.q_proj.bias": (gated * q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
    if config["qk_norm"]:
        attn |= {"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)}
    dense = {"mlp.gate_proj.weight": (inter, H), "mlp.up_proj.weight": (inter, H), "mlp.down_proj.weight": (H, inter)}
    shapes = {"model.embed_tokens.weight": (V, H), "lm_head.weight": (V, H)} | {f"model.norm.{k}": (H,) for k in norm_params(config)}
    for i in range(config["num_hidden_layers"]):
        mixer = linear_attn_shapes(config) if is_linear(config, i) else attn
        mlp = moe_shapes(config) if is_moe(config, i) else dense
        shapes |= {f"model.layers.{i}.{name}": shape for name, shape in (norms | mixer | mlp).items()}
    return shapes


def norm_params(config: dict) -> list[str]:
    return ["weight"] if "rms_norm_eps" in config else ["weight", "bias"]  # RMSNorm (Llama) or LayerNorm (StableLM)


def is_linear(config: dict, layer: int) -> bool:
    return "layer_types" in config and config["layer_types"][layer] == "linear_attention"


def linear_attn_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    H, nk, nv = config["hidden_size"], config["linear_num_key_heads"], config["linear_num_value_heads"]
    key, value = nk * config["linear_key_head_dim"], nv * config["linear_value_head_dim"]
    return {"linear_attn.in_proj_qkvz.weight": (2 * key + 2 * value, H), "linear_attn.in_proj_ba.weight": (2 * nv, H),
            "linear_attn.conv1d.weight": (2 * key + value, 1, config["linear_conv_kernel_dim"]),
            "linear_attn.A_log": (nv,), "linear_attn.dt_bias": (nv,),
            "linear_attn.norm.weight": (config["linear_value_head_dim"],), "linear_attn.out_proj.weight": (H, value)}


def is_moe(config: dict, layer: int) -> bool:
    return config.get("num_experts", 0) > 0 and layer not in config["mlp_only_layers"]


def moe_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    H, inter, shared = config["hidden_size"], config["moe_intermediate_size"], config["shared_expert_intermediate_size"]
    shapes = {"mlp.gate.weight": (config["num_experts"], H), "mlp.shared_expert.gate_proj.weight": (shared, H),
              "mlp.shared_expert.up_proj.weight": (shared, H), "mlp.shared_expert.down_proj.weight": (H, shared)}
    if config["shared_expert_gate"]:
        shapes["mlp.shared_expert_gate.weight"] = (1, H)
    if config["scoring_func"] == "sigmoid":
        shapes["mlp.gate.e_score_correction_bias"] = (config["num_experts"],)
    for e in range(config["num_experts"]):
        shapes |= {f"mlp.experts.{e}.gate_proj.weight": (inter, H), f"mlp.experts.{e}.up_proj.weight": (inter, H),
                   f"mlp.experts.{e}.down_proj.weight": (H, inter)}
    return shapes


def load_checkpoint(path: str | Path, config_path: str | Path = "config.json") -> Model:
    config = json.loads(Path(config_path).read_text())
    weights = {}
    with np.load(path, allow_pickle=False) as f:
        for name, shape in expected_shapes(config).items():
            weights[name] = f[name].astype(np.float64)
            if weights[name].shape != shape:
                raise ValueError(f"{name} has shape {weights[name].shape}, expected {shape}")
    return Model(config, weights)


def norm(x: np.ndarray, w: dict, key: str, config: dict) -> np.ndarray:
    """RMSNorm, or LayerNorm with a bias (`layer_norm_eps` in the config); the weight stored as
    the multiplier or, with norm_weight_offset (Gemma), as its offset from 1."""
    scale = 1.0 + w[key] if config["norm_weight_offset"] else w[key]
    if "rms_norm_eps" in config:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + config["rms_norm_eps"]) * scale
    x = x - x.mean(axis=-1, keepdims=True)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + config["layer_norm_eps"]) * scale + \
        w[key.removesuffix("weight") + "bias"]


def rotate(x: np.ndarray, interleaved: bool) -> np.ndarray:
    """rotate_half (Llama: halves [x1, x2] -> [-x2, x1]) or, with rope_interleave (GLM), pairs
    (x0, x1) -> (-x1, x0)."""
    if interleaved:
        return np.stack((-x[..., 1::2], x[..., 0::2]), axis=-1).reshape(x.shape)
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate((-x2, x1), axis=-1)


def apply_rope(x: np.ndarray, config: dict) -> np.ndarray:
    """x: (T, heads, head_dim); rotates the first partial_rotary_factor of each head."""
    dim, interleaved = int(config["head_dim"] * config["partial_rotary_factor"]), config["rope_interleave"]
    inv_freq = 1.0 / config["rope_theta"] ** (np.arange(0, dim, 2) / dim)
    freqs = np.outer(np.arange(x.shape[0]), inv_freq)
    emb = (np.repeat(freqs, 2, axis=-1) if interleaved else np.concatenate((freqs, freqs), axis=-1))[:, None, :]
    rot, rest = x[..., :dim], x[..., dim:]
    rot = rot * np.cos(emb) + rotate(rot, interleaved) * np.sin(emb)
    return np.concatenate((rot, rest), axis=-1)


def self_attn(h: np.ndarray, w: dict, p: str, config: dict) -> np.ndarray:
    T, d = h.shape[0], config["head_dim"]
    nq, nkv = config["num_attention_heads"], config["num_key_value_heads"]
    q, k, v = (h @ w[p + name + ".weight"].T for name in ("q_proj", "k_proj", "v_proj"))
    if config["qkv_bias"]:
        q, k, v = q + w[p + "q_proj.bias"], k + w[p + "k_proj.bias"], v + w[p + "v_proj.bias"]
    if config.get("attn_output_gate"):  # per head: [query; gate]
        q, gate = np.split(q.reshape(T, nq, 2 * d), 2, axis=-1)
    q, k, v = q.reshape(T, nq, d), k.reshape(T, nkv, d), v.reshape(T, nkv, d)
    if config["qk_norm"]:
        q, k = norm(q, w, p + "q_norm.weight", config), norm(k, w, p + "k_norm.weight", config)
    q, k = apply_rope(q, config), apply_rope(k, config)
    k, v = np.repeat(k, nq // nkv, axis=1), np.repeat(v, nq // nkv, axis=1)  # query head h reads kv head h // (nq / nkv)
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
    scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    out = np.einsum("hqk,khd->qhd", probs, v)
    if config.get("attn_output_gate"):
        out = out / (1 + np.exp(-gate))
    return out.reshape(T, nq * d) @ w[p + "o_proj.weight"].T


def linear_attn(h: np.ndarray, w: dict, p: str, config: dict) -> np.ndarray:
    """Gated DeltaNet: causal depthwise conv, then the delta rule per value head, as a loop over tokens."""
    T, nk, nv = h.shape[0], config["linear_num_key_heads"], config["linear_num_value_heads"]
    dk, dv, r = config["linear_key_head_dim"], config["linear_value_head_dim"], nv // nk
    qkvz = (h @ w[p + "in_proj_qkvz.weight"].T).reshape(T, nk, 2 * dk + 2 * r * dv)  # grouped per key head
    q, k, v, z = np.split(qkvz, [dk, 2 * dk, 2 * dk + r * dv], axis=-1)
    b, a = (x.reshape(T, nv) for x in np.split((h @ w[p + "in_proj_ba.weight"].T).reshape(T, nk, 2 * r), 2, axis=-1))
    mixed = np.concatenate([q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)], axis=-1)  # conv channels
    kernel = w[p + "conv1d.weight"][:, 0]  # (channels, K); output t reads inputs t-K+1 .. t
    padded = np.concatenate([np.zeros((kernel.shape[1] - 1, mixed.shape[1])), mixed])
    mixed = sum(padded[j:j + T] * kernel[:, j] for j in range(kernel.shape[1]))
    mixed = mixed / (1 + np.exp(-mixed))
    q, k, v = np.split(mixed, [nk * dk, 2 * nk * dk], axis=-1)
    q, k = (np.repeat(x.reshape(T, nk, dk), r, axis=1) for x in (q, k))
    q, k = (x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + 1e-6) for x in (q, k))
    q, v = q / np.sqrt(dk), v.reshape(T, nv, dv)
    beta = 1 / (1 + np.exp(-b))
    g = -np.exp(w[p + "A_log"]) * np.logaddexp(0, a + w[p + "dt_bias"])
    state, out = np.zeros((nv, dk, dv)), np.empty((T, nv, dv))
    for t in range(T):
        state = state * np.exp(g[t])[:, None, None]
        delta = (v[t] - np.einsum("hk,hkv->hv", k[t], state)) * beta[t][:, None]
        state = state + k[t][:, :, None] * delta[:, None, :]
        out[t] = np.einsum("hk,hkv->hv", q[t], state)
    out = out / np.sqrt(np.mean(out * out, axis=-1, keepdims=True) + config["rms_norm_eps"]) * w[p + "norm.weight"]  # w, never 1 + w
    z = z.reshape(T, nv, dv)
    return (out * z / (1 + np.exp(-z))).reshape(T, -1) @ w[p + "out_proj.weight"].T


def mlp(h: np.ndarray, w: dict, p: str) -> np.ndarray:
    gate, up = h @ w[p + "gate_proj.weight"].T, h @ w[p + "up_proj.weight"].T
    return (gate / (1 + np.exp(-gate)) * up) @ w[p + "down_proj.weight"].T


def sparse_moe(h: np.ndarray, w: dict, p: str, config: dict) -> np.ndarray:
    """The top num_experts_per_tok experts by softmax over all (Qwen2-MoE) or by sigmoid plus
    e_score_correction_bias (DeepSeek-V3), weighted by their unbiased scores, renormalised if
    norm_topk_prob, times routed_scaling_factor; plus the shared expert, gated if configured."""
    logits = h @ w[p + "gate.weight"].T
    if config["scoring_func"] == "sigmoid":
        scores = 1 / (1 + np.exp(-logits))
        choose = scores + w[p + "gate.e_score_correction_bias"]
    else:
        scores = np.exp(logits - logits.max(axis=-1, keepdims=True))
        choose = scores = scores / scores.sum(axis=-1, keepdims=True)
    top = np.argsort(-choose, axis=-1, kind="stable")[:, : config["num_experts_per_tok"]]
    chosen = np.take_along_axis(scores, top, axis=-1)
    if config["norm_topk_prob"]:
        chosen /= chosen.sum(axis=-1, keepdims=True)
    chosen = chosen * config.get("routed_scaling_factor", 1.0)
    out = 0.0
    for e in range(config["num_experts"]):
        weight = np.sum(chosen * (top == e), axis=-1, keepdims=True)
        out = out + weight * mlp(h, w, p + f"experts.{e}.")
    shared = mlp(h, w, p + "shared_expert.")
    if config["shared_expert_gate"]:
        shared = shared / (1 + np.exp(-h @ w[p + "shared_expert_gate.weight"].T))
    return out + shared


def forward(model: Model, tokens: np.ndarray) -> np.ndarray:
    """tokens: (T,) int -> logits (T, vocab_size) float64."""
    config, w = model.config, model.weights
    x = w["model.embed_tokens.weight"][np.asarray(tokens)]
    if config["scale_embeddings"]:
        x = x * np.sqrt(config["hidden_size"])
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = norm(x, w, p + "input_layernorm.weight", config)
        x = x + (linear_attn(h, w, p + "linear_attn.", config) if is_linear(config, i) else
                 self_attn(h, w, p + "self_attn.", config))
        h = norm(x, w, p + "post_attention_layernorm.weight", config)
        x = x + (sparse_moe(h, w, p + "mlp.", config) if is_moe(config, i) else mlp(h, w, p + "mlp."))
    return norm(x, w, "model.norm.weight", config) @ w["lm_head.weight"].T
