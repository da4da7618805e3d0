"""Megatron-Core's Gated DeltaNet mixer (megatron/core/ssm/gated_delta_net.py) in numpy: one
tensor-parallel rank's share, computed as that rank computes it."""
import numpy as np


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def l2norm(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + 1e-6)


def gated_delta_net(h: np.ndarray, w: dict, p: str, args: dict, norm) -> np.ndarray:
    """(T, hidden) -> this rank's partial sum of out_proj, (T, hidden). norm(x, w, key, args) is
    the model's norm (out_norm), applied per value head before the SiLU gate."""
    T, tp = h.shape[0], args["tensor_model_parallel_size"]
    nk, nv = args["linear_num_key_heads"] // tp, args["linear_num_value_heads"] // tp  # this rank's heads
    dk, dv = args["linear_key_head_dim"], args["linear_value_head_dim"]
    # in_proj: this rank's [query | key | value | z | beta | alpha], each for its own heads.
    qkv, z, b, a = np.split(h @ w[p + "in_proj.weight"].T, np.cumsum([2 * nk * dk + nv * dv, nv * dv, nv]), axis=-1)
    kernel = w[p + "conv1d.weight"][:, 0]  # (channels, K): causal depthwise, then SiLU
    padded = np.concatenate([np.zeros((kernel.shape[1] - 1, qkv.shape[1])), qkv])
    qkv = silu(sum(padded[j:j + T] * kernel[:, j] for j in range(kernel.shape[1])))
    q, k, v = np.split(qkv, [nk * dk, 2 * nk * dk], axis=-1)
    q, k = (np.repeat(l2norm(x.reshape(T, nk, dk)), nv // nk, axis=1) for x in (q, k))
    q, v = q / np.sqrt(dk), v.reshape(T, nv, dv)
    g = -np.exp(w[p + "A_log"]) * np.logaddexp(0, a + w[p + "dt_bias"])
    beta = 1 / (1 + np.exp(-b))
    state, out = np.zeros((nv, dk, dv)), np.empty((T, nv, dv))
    for t in range(T):  # the gated delta rule, token by token
        state = state * np.exp(g[t])[:, None, None]
        delta = (v[t] - np.einsum("hk,hkv->hv", k[t], state)) * beta[t][:, None]
        state = state + k[t][:, :, None] * delta[:, None, :]
        out[t] = np.einsum("hk,hkv->hv", q[t], state)
    out = norm(out, w, p + "out_norm.weight", args) * silu(z.reshape(T, nv, dv))
    return out.reshape(T, -1) @ w[p + "out_proj.weight"].T
