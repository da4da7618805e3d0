"""Random weights for the original model, laid out in the files Megatron-Core's ranks save,
and the distributed optimizer's saved parameter state.

Never part of a workspace. A tensor replicated across ranks is drawn once and stored in
every file that holds it; a sharded one is drawn shard by shard. Each rank's tensors are in
the order of the saved state dict: a module's own parameters, then its Transformer Engine
`_extra_state` (not a parameter), then its submodules' entries, in the order they were
registered. Without the extra states that is the order of named_parameters().
"""
import numpy as np

from conversions import Files, buffers
from data.source_model import chunks, linear_attention, ranks

# TE's extra state with FP8 off is an empty uint8 tensor for every module, norms included: modules'
# (TransformerEngineBaseModule.get_extra_state) and, since TE 2.9 (PR #2253), fusible ops', which TE's
# norms are (ops/op.py BasicOperation.get_extra_state; before, the pickled empty dict). Megatron-LM
# 77a00ec1c9 asks for transformer-engine>=2.9.0a0,<2.12.0 (its pyproject.toml's dev extra).
TE_MODULE_STATE = TE_NORM_STATE = np.zeros(0, np.uint8)


def float_to_bf16(x: np.ndarray) -> np.ndarray:
    """float -> uint16 bfloat16 bit patterns, rounding to nearest even."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def random_files(args: dict, rng: np.random.Generator) -> Files:
    """(tensor, pipeline, expert) rank -> that rank's tensors (float64), in registration order."""
    tp, ep = args["tensor_model_parallel_size"], args["expert_model_parallel_size"]
    H, d, ffn = args["hidden_size"], args["kv_channels"], args["ffn_hidden_size"]
    heads, groups = args["num_attention_heads"], args["num_query_groups"]
    files = {rank: {} for rank in ranks(args)}

    def normal(*shape: int, std: float) -> np.ndarray:
        return rng.normal(0.0, std, shape)

    def put(key: str, shards: list[np.ndarray], stage: int, experts=range(ep)) -> None:
        """Store tensor-parallel shard t in the files of rank t on `stage`, for each expert rank."""
        for t in range(tp):
            for e in experts:
                files[t, stage, e][key] = shards[t]

    def norm(key: str, n: int, stage: int, te_state=TE_NORM_STATE) -> None:
        """`key` + weight (and + bias under LayerNorm: TE's LayerNorm and LayerNormLinear)."""
        put(key + "weight", [normal(n, std=0.3) + (0.0 if args["layernorm_zero_centered_gamma"] else 1.0)] * tp, stage)
        if args["normalization"] == "LayerNorm":
            put(key + "bias", [normal(n, std=0.3)] * tp, stage)
        if te_state is not None:  # None: the norm is fused into the TE linear that follows
            put(key + "_extra_state", [te_state] * tp, stage)

    def sharded(key: str, stage: int, *shape: int, std: float, te_state=TE_MODULE_STATE) -> None:
        put(key + "weight", [normal(*shape, std=std) for _ in range(tp)], stage)
        put(key + "_extra_state", [te_state] * tp, stage)

    def fc1_fc2(p: str, stage: int, size: int) -> None:
        sharded(p + "linear_fc1.", stage, 2 * size // tp, H, std=H**-0.5)
        sharded(p + "linear_fc2.", stage, H, size // tp, std=size**-0.5)

    def gated_delta_net(a: str, stage: int) -> None:
        """GatedDeltaNet registers in_proj, conv1d, dt_bias, A_log, out_norm, out_proj; its own
        parameters (dt_bias, A_log) come before its submodules'. Per rank, in_proj's rows are
        [q | k | v | z | beta | alpha] of the rank's heads, conv1d's channels [q | k | v]."""
        nk, nv = args["linear_num_key_heads"] // tp, args["linear_num_value_heads"] // tp
        key, value = nk * args["linear_key_head_dim"], nv * args["linear_value_head_dim"]
        put(a + "dt_bias", [normal(nv, std=0.5) for _ in range(tp)], stage)
        put(a + "A_log", [np.log(rng.uniform(1, 16, nv)) for _ in range(tp)], stage)
        norm(a + "in_proj.layer_norm_", H, stage, te_state=None)
        sharded(a + "in_proj.", stage, 2 * key + 2 * value + 2 * nv, H, std=H**-0.5)
        put(a + "conv1d.weight", [normal(2 * key + value, 1, args["linear_conv_kernel_dim"], std=0.5)
                                  for _ in range(tp)], stage)
        norm(a + "out_norm.", args["linear_value_head_dim"], stage)
        sharded(a + "out_proj.", stage, H, value, std=0.2 * (value * tp) ** -0.5)

    def experts(p: str, stage: int) -> None:
        """Each expert rank's own experts, per expert-tensor rank (= tensor rank, source_model.moe)
        fc1 [gate | up] of its slice and fc2, in the checkpoint's format (moe/experts.py): legacy
        GroupedMLP allocates weight1 (hidden, local * 2 * ffn / etp) and weight2 (local * ffn / etp,
        hidden) and uses them as view(local, hidden, -1) and view(local, -1, hidden), [in, out];
        TEGroupedMLP's linear_fc1 holds weight{i} per expert and SequentialMLP local_experts.{i}
        an MLP, both [out, in], each TE module with its extra state after its weights."""
        local, f = args["num_experts"] // ep, args["moe_ffn_hidden_size"] // args["expert_tensor_parallel_size"]
        legacy = args["moe_grouped_gemm"] and args["moe_use_legacy_grouped_gemm"]
        for e in range(ep):
            w1 = [normal(local, H, 2 * f, std=H**-0.5) for _ in range(tp)]  # [in, out] per expert
            w2 = [normal(local, f, H, std=(tp * f) ** -0.5) for _ in range(tp)]
            if legacy:
                put(p + "weight1", [w.reshape(H, -1) for w in w1], stage, [e])
                put(p + "weight2", [w.reshape(-1, H) for w in w2], stage, [e])
            elif args["moe_grouped_gemm"]:
                for n, w in ((1, w1), (2, w2)):
                    for i in range(local):
                        put(p + f"linear_fc{n}.weight{i}", [x[i].T for x in w], stage, [e])
                    put(p + f"linear_fc{n}._extra_state", [TE_MODULE_STATE] * tp, stage, [e])
            else:
                for i in range(local):
                    for n, w in ((1, w1), (2, w2)):
                        put(p + f"local_experts.{i}.linear_fc{n}.weight", [x[i].T for x in w], stage, [e])
                        put(p + f"local_experts.{i}.linear_fc{n}._extra_state", [TE_MODULE_STATE] * tp, stage, [e])

    order = chunks(args)
    (first, fp), (last, lp) = order[0], order[-1]
    vocab_rows = args["padded_vocab_size"] // tp
    table = [normal(vocab_rows, H, std=1.0) for _ in range(tp)]
    put(fp + "embedding.word_embeddings.weight", table, first)
    # Per query group: [q heads, their output gates if attention_output_gate, k, v].
    qkv_rows = ((1 + args["attention_output_gate"]) * heads + 2 * groups) * d // tp
    number = 0
    for stage, prefix in order:
        for i in range(args["num_layers"] // len(order)):
            p = f"{prefix}decoder.layers.{i}."
            a = p + "self_attention."
            if linear_attention(args, number):
                gated_delta_net(a, stage)
            else:
                # Attention registers core_attention and linear_proj before SelfAttention adds linear_qkv
                # (transformer/attention.py); TE's LayerNormLinear registers layer_norm_weight before weight and bias.
                put(a + "core_attention._extra_state", [TE_MODULE_STATE] * tp, stage)
                sharded(a + "linear_proj.", stage, H, heads * d // tp, std=(heads * d) ** -0.5)
                norm(a + "linear_qkv.layer_norm_", H, stage, te_state=None)
                put(a + "linear_qkv.weight", [normal(qkv_rows, H, std=H**-0.5) for _ in range(tp)], stage)
                if args["add_qkv_bias"]:
                    put(a + "linear_qkv.bias", [normal(qkv_rows, std=0.5) for _ in range(tp)], stage)
                put(a + "linear_qkv._extra_state", [TE_MODULE_STATE] * tp, stage)
                if args["qk_layernorm"]:
                    norm(a + "q_layernorm.", d, stage)
                    norm(a + "k_layernorm.", d, stage)
            if args["num_experts"] and args["moe_layer_freq"][number]:
                norm(p + "pre_mlp_layernorm.", H, stage)
                put(p + "mlp.router.weight", [normal(args["num_experts"], H, std=3 * H**-0.5)] * tp, stage)
                if args["moe_router_enable_expert_bias"]:  # a persistent fp32 buffer, after the router's weight
                    put(p + "mlp.router.expert_bias", [normal(args["num_experts"], std=0.2).astype(np.float32)] * tp, stage)
                experts(p + "mlp.experts.", stage)
                if args["moe_shared_expert_gate"]:  # SharedExpertMLP's own parameter, before its linear layers
                    put(p + "mlp.shared_experts.gate_weight", [normal(1, H, std=H**-0.5)] * tp, stage)
                fc1_fc2(p + "mlp.shared_experts.", stage, args["moe_shared_expert_intermediate_size"])
            else:
                norm(p + "mlp.linear_fc1.layer_norm_", H, stage, te_state=None)
                fc1_fc2(p + "mlp.", stage, ffn)
            number += 1
    norm(lp + "decoder.final_layernorm.", H, last)
    if args["untie_embeddings_and_output_weights"]:
        put(lp + "output_layer.weight", [normal(vocab_rows, H, std=1.0) for _ in range(tp)], last)
    elif args["pipeline_model_parallel_size"] > 1:  # tied: the last stage keeps its own copy, synced to the
        put(lp + "output_layer.weight", table, last)  # embedding (LanguageModule.setup_embeddings_and_output_layer)
    return files


def to_bf16(files: Files) -> Files:
    """Parameters as bf16 bits; fp32 buffers and TE extra states (uint8) as they are."""
    return {rank: {k: float_to_bf16(v) if v.dtype == np.float64 else v for k, v in tensors.items()}
            for rank, tensors in files.items()}


def optimizer_files(args: dict, main: Files, rng: np.random.Generator) -> Files:
    """Each rank's distrib_optim state: ChainedOptimizer.save_parameter_state saves a list, the
    dense then the expert optimizer's get_parameter_state_dp_zero, None where that optimizer's
    data-parallel rank is not 0. The dense data-parallel group spans the expert ranks (rank
    order tp-cp-ep-dp-pp, parallel_state.py), so only expert rank 0 holds the dense state.
    Flattened to npz keys 'optimizer/buffer/dtypes/name'; a None entry has no keys."""
    out = {}
    for (t, p, e), tensors in main.items():
        flat = {}
        for index, expert in enumerate((False, True)):
            if not expert and e > 0:
                continue
            flat[f"{index}/buckets_coalesced"] = np.array(True)
            for g, (starts, numel) in enumerate(buffers(tensors, args, expert)):
                key = f"{index}/{g}/bfloat16,float32/"
                param, used = np.zeros(numel, np.float32), np.zeros(numel, bool)  # the gaps hold zeros
                for name, start in starts.items():
                    param[start:start + tensors[name].size] = tensors[name].ravel()
                    used[start:start + tensors[name].size] = True
                flat[key + "param"] = param
                flat[key + "exp_avg"] = np.where(used, rng.normal(0, 1e-4, numel), 0).astype(np.float32)
                flat[key + "exp_avg_sq"] = np.where(used, rng.gamma(1.0, 1e-8, numel), 0).astype(np.float32)
                flat[key + "numel_unpadded"] = np.array(numel)
        out[t, p, e] = flat
    return out
