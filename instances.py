"""Task instances: the level presets, each seed's draw of the conventions a level puts in play,
the original model's files, the token sequences it is compared on, and the workspace.

An instance is a pure function of (level, seed): the grader rebuilds the pristine original
from those two numbers and never reads it from a workspace.
"""
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from conversions import is_parameter
from data.megatron_checkpoint import Files, optimizer_files, random_files, to_bf16
from data.source_model import Checkpoint, bf16_to_float, forward, linear_attention, rank_file

DATA = Path(__file__).parent / "data"
SEQ_LEN = 32  # longest sequence the grader runs
ROUTING_MARGIN = 1e-3  # a graded sequence's routing stays this far from a tie, so float32 rounding cannot flip it
ROUTING_REDRAWS = 20


class Level(NamedTuple):
    args: dict  # the parallel layout and the model's features: fixed for the level
    draws: tuple[str, ...]  # the conventions whose value each seed draws (draw_conventions)
    shown: str  # what the workspace holds to check against: "source", "reference" or "nothing"


# Each level adds features to the last; within a level, each seed draws the conventions in play.
_L1 = {"num_layers": 2, "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
       "virtual_pipeline_model_parallel_size": None, "expert_model_parallel_size": 1, "num_experts": None,
       "use_distributed_optimizer": False, "experimental_attention_variant": None}
_L4 = {**_L1, "tensor_model_parallel_size": 2}
_L6 = {**_L4, "num_layers": 4, "pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2}
_L7 = {**_L6, "expert_model_parallel_size": 2, "num_experts": 4, "moe_layer_freq": [0, 1, 1, 1], "moe_router_topk": 2}
_L8 = {**_L7, "use_distributed_optimizer": True}
_L10 = {**_L8, "experimental_attention_variant": "gated_delta_net", "linear_attention_freq": 4, "linear_conv_kernel_dim": 4,
        "linear_num_key_heads": 4, "linear_num_value_heads": 8}
_BASIC, _NORMS = ("heads", "output"), ("heads", "output", "rope", "norms")
LEVELS = {1: Level(_L1, _BASIC, "source"), 2: Level(_L1, (*_BASIC, "rope"), "source"), 3: Level(_L1, _NORMS, "source"),
          4: Level(_L4, _NORMS, "source"), 5: Level(_L4, _NORMS, "reference"), 6: Level(_L6, _NORMS, "reference"),
          7: Level(_L7, (*_NORMS, "moe"), "reference"), 8: Level(_L8, (*_NORMS, "moe"), "reference"),
          9: Level(_L8, (*_NORMS, "moe"), "nothing"), 10: Level(_L10, (*_NORMS, "moe", "hybrid"), "reference"),
          11: Level(_L10, (*_NORMS, "moe", "hybrid"), "nothing")}

GQA_LAYOUTS = [(6, 2), (8, 2), (8, 4), (12, 4)]  # (heads, kv groups)
ITERATIONS = [500, 1000, 2000, 5000]  # the iteration the checkpoint was saved at


@dataclass
class Instance:
    level: int
    seed: int
    args: dict  # megatron_args.json
    config: dict  # the runtime's config.json
    files: Files  # per (tensor, pipeline, expert) rank: model_optim_rng, bf16 bits
    optimizer: Files  # per rank: distrib_optim, flattened; empty without the distributed optimizer
    main: Files  # per rank: the fp32 main parameters, with the distributed optimizer

    def original(self) -> Checkpoint:
        """The original model for source_model.forward: the fp32 main parameters if any, else the bf16
        weights; with the fp32 buffers (the router's expert_bias) either way."""
        files = {r: {k: bf16_to_float(v) if v.dtype == np.uint16 else v for k, v in f.items() if v.dtype != np.uint8}
                 for r, f in self.files.items()}
        files = {r: files[r] | self.main.get(r, {}) for r in files}
        return Checkpoint(self.args, {r: {k: v.astype(np.float64) for k, v in f.items()} for r, f in files.items()})


def draw_conventions(level: Level, rng: np.random.Generator) -> tuple[dict, dict]:
    """The training run's flags and the runtime's conventions (Megatron arguments, config entries)
    that the level puts in play, each value drawn; the others keep Megatron's and Llama's defaults."""
    def coin(p: float = 0.5) -> bool:
        return bool(rng.random() < p)

    tp, hybrid = level.args["tensor_model_parallel_size"], "hybrid" in level.draws
    heads, groups = GQA_LAYOUTS[rng.integers(len(GQA_LAYOUTS))]
    kind = rng.choice(["gqa", "mha", "mqa"] if tp == 1 else ["gqa", "mha"])  # MQA's one group cannot split over tp
    heads, groups = (heads, heads) if kind == "mha" else (heads, 1) if kind == "mqa" else (heads, groups)
    args = {"num_attention_heads": heads, "group_query_attention": kind != "mha", "num_query_groups": groups,
            "untie_embeddings_and_output_weights": coin(), "rotary_interleaved": False, "rotary_percent": 1.0,
            "rotary_base": 10000, "normalization": "RMSNorm", "qk_layernorm": False, "add_qkv_bias": False,
            "layernorm_zero_centered_gamma": False}
    config = {"rope_interleave": False, "norm_weight_offset": False, "scale_embeddings": False}
    if "rope" in level.draws:  # Megatron's rotary layout and the runtime's (GLM's interleaved, Llama's halves)
        args |= {"rotary_interleaved": coin(), "rotary_base": int(rng.choice([10000, 1000000]))}
        config["rope_interleave"] = coin()
    if "norms" in level.draws:
        rms = hybrid or coin()
        args |= {"rotary_percent": float(rng.choice([0.5, 1.0])), "normalization": "RMSNorm" if rms else "LayerNorm",
                 "qk_layernorm": rms and coin(0.6), "add_qkv_bias": coin(), "layernorm_zero_centered_gamma": coin()}
        config |= {"norm_weight_offset": coin(), "scale_embeddings": coin()}  # Gemma's conventions, or Llama's
    if "moe" in level.draws:
        sigmoid, scale = coin(), coin()
        args |= {"moe_router_score_function": "sigmoid" if sigmoid else "softmax", "moe_router_pre_softmax": coin(),
                 "moe_router_enable_expert_bias": sigmoid and coin(0.6), "moe_shared_expert_gate": coin(),
                 "moe_router_topk_scaling_factor": float(rng.choice([1.5, 2.0, 2.5, 3.0])) if scale else None}
        args |= dict(zip(("moe_grouped_gemm", "moe_use_legacy_grouped_gemm"),
                         [(True, True), (True, False), (False, False)][rng.integers(3)]))
        if sigmoid:  # DeepSeek-V3: e_score_correction_bias, and a routed_scaling_factor the run may match
            config |= {"scoring_func": "sigmoid", "norm_topk_prob": True,
                       "routed_scaling_factor": args["moe_router_topk_scaling_factor"] if scale and coin() else 1.0}
        else:  # Qwen2-MoE: the top-k renormalised or not, and no scaling factor
            config |= {"scoring_func": "softmax", "norm_topk_prob": not args["moe_router_pre_softmax"]}
        config["shared_expert_gate"] = args["moe_shared_expert_gate"]
    if hybrid:
        args["attention_output_gate"] = coin()
        config["attn_output_gate"] = args["attention_output_gate"]
    return args, config


def make_instance(level: int, seed: int) -> Instance:
    if level not in LEVELS:
        raise ValueError(f"level must be one of {sorted(LEVELS)}, got {level}")
    rng = np.random.default_rng([level, seed])
    drawn_args, drawn_config = draw_conventions(LEVELS[level], rng)
    d, hidden = int(rng.choice([16, 24])), int(rng.choice([48, 64]))
    ffn, vocab = int(rng.choice([64, 96, 128])), int(rng.integers(200, 250))
    level_args = {"attention_output_gate": False, **LEVELS[level].args, **drawn_args}
    tp, pp, layers = (level_args[k] for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "num_layers"))
    world = tp * pp * level_args["expert_model_parallel_size"]  # expert data-parallel size 1
    args = {"hidden_size": hidden, "ffn_hidden_size": ffn, "kv_channels": d, "layernorm_epsilon": 1e-5,
            "position_embedding_type": "rope", **level_args, "expert_tensor_parallel_size": tp,
            "add_bias_linear": False, "swiglu": True, "vocab_size": vocab, "make_vocab_size_divisible_by": 128,
            "padded_vocab_size": -(-vocab // (128 * tp)) * 128 * tp, "seq_length": SEQ_LEN,
            "max_position_embeddings": SEQ_LEN, "bf16": True, "transformer_impl": "transformer_engine",
            "world_size": world, "data_parallel_size": world // (tp * pp), "ckpt_format": "torch",
            "optimizer": "adam", "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_eps": 1e-8,
            "accumulate_allreduce_grads_in_fp32": True, "overlap_grad_reduce": False, "overlap_param_gather": False}
    eps = {"rms_norm_eps" if args["normalization"] == "RMSNorm" else "layer_norm_eps": 1e-5}
    config = {"hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
              "num_attention_heads": args["num_attention_heads"], "num_key_value_heads": args["num_query_groups"],
              "head_dim": d, "vocab_size": vocab, **eps, "rope_theta": float(args["rotary_base"]),
              "partial_rotary_factor": args["rotary_percent"], "qkv_bias": args["add_qkv_bias"],
              "qk_norm": args["qk_layernorm"], "tie_word_embeddings": not args["untie_embeddings_and_output_weights"],
              **drawn_config}
    if args["num_experts"]:
        # Expert ffn = tp * hidden keeps each rank's per-expert blocks square, so shapes show no orientation.
        args |= {"moe_ffn_hidden_size": tp * hidden, "moe_shared_expert_intermediate_size": ffn}
        config |= {"num_experts": args["num_experts"], "num_experts_per_tok": args["moe_router_topk"],
                   "moe_intermediate_size": tp * hidden, "shared_expert_intermediate_size": ffn,
                   "mlp_only_layers": [i for i in range(layers) if not args["moe_layer_freq"][i]]}
    if args["experimental_attention_variant"]:  # key and value head sizes differ, so no layout hides
        args |= {"linear_key_head_dim": int(rng.choice([8, 16])), "linear_value_head_dim": 12}
        config |= {k: v for k, v in args.items() if k.startswith("linear_") and k != "linear_attention_freq"}
        config["layer_types"] = ["linear_attention" if linear_attention(args, i) else "full_attention" for i in range(layers)]
    values = random_files(args, rng)
    args["train_iters"] = int(rng.choice(ITERATIONS))  # the checkpoint is the one saved at the end
    if not args["use_distributed_optimizer"]:
        return Instance(level, seed, args, config, to_bf16(values), {}, {})
    main = {r: {k: v.astype(np.float32) for k, v in f.items() if is_parameter(k)} for r, f in values.items()}
    return Instance(level, seed, args, config, to_bf16(values), optimizer_files(args, main, rng), main)


def covering_rows(vocab: int, rng: np.random.Generator) -> np.ndarray:
    """Every token id once, in random order, padded with random ids to rows of SEQ_LEN."""
    fill = -vocab % SEQ_LEN
    return np.concatenate([rng.permutation(vocab), rng.integers(vocab, size=fill)]).reshape(-1, SEQ_LEN)


def token_sequences(vocab: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Sequences covering every token id, length 1, length SEQ_LEN and repeated tokens."""
    a, b = rng.integers(vocab, size=2)
    return [*covering_rows(vocab, rng), rng.integers(vocab, size=1), np.full(SEQ_LEN, a),
            np.resize([a, b], SEQ_LEN), rng.integers(vocab, size=int(rng.integers(2, SEQ_LEN)))]


def original_logits(original: Checkpoint, tokens: np.ndarray, rng: np.random.Generator):
    """(tokens, the original's logits), redrawn while any token's expert choice is within
    ROUTING_MARGIN of a tie: reordered, or a new token if all are the same. None if no draw is clear."""
    for _ in range(ROUTING_REDRAWS):
        margins = []
        logits = forward(original, tokens, margins)
        if min(margins, default=np.inf) >= ROUTING_MARGIN:
            return tokens, logits
        repeated = len(set(tokens.tolist())) == 1
        tokens = np.full(len(tokens), rng.integers(original.args["vocab_size"])) if repeated else rng.permutation(tokens)
    return None


def write_workspace(workspace: str | Path, inst: Instance) -> None:
    ws, iteration = Path(workspace), inst.args["train_iters"]
    for name, files in (("model_optim_rng.npz", inst.files), ("distrib_optim.npz", inst.optimizer)):
        for rank, tensors in files.items():
            (ws / "checkpoint" / rank_file(inst.args, *rank, iteration)).parent.mkdir(parents=True, exist_ok=True)
            np.savez(ws / "checkpoint" / rank_file(inst.args, *rank, iteration, name), **tensors)
    (ws / "checkpoint" / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    (ws / "megatron_args.json").write_text(json.dumps(inst.args, indent=2) + "\n")
    (ws / "config.json").write_text(json.dumps(inst.config, indent=2) + "\n")
    shown = LEVELS[inst.level].shown
    for name in ["target_model.py", *["source_model.py", "source_gdn.py"] * (shown == "source")]:
        shutil.copy(DATA / name, ws / name)
    if shown == "reference":
        rng = np.random.default_rng([inst.level, inst.seed, 1])
        original = inst.original()
        drawn = [d for row in covering_rows(inst.args["vocab_size"], rng) if (d := original_logits(original, row, rng))]
        np.savez(ws / "reference.npz", tokens=np.stack([t for t, _ in drawn]), logits=np.stack([x for _, x in drawn]))
