"""The task: port a Megatron-Core tensor-parallel checkpoint to a Hugging Face-style runtime.

This file is the task's contract: the level presets, the instance generator, the prompt
and the tool schemas. `python task.py --workspace DIR` writes an instance to try by hand.
"""
import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from data.source_model import Checkpoint, bf16_to_float, forward
from tools import CALL_TIMEOUT_S, OUTPUT_LIMIT

DATA = Path(__file__).parent / "data"
TOLERANCE = 1e-4  # max |logit difference| that passes
MAX_SUBMISSION_BYTES = 64 * 2**20  # archive size, and again its unpacked size
SEQ_LEN = 32  # longest sequence the grader runs
DEFAULT_LEVEL = 5
DEFAULT_MAX_STEPS = 40  # model replies per run, stated in the prompt



class Level(NamedTuple):
    args: dict  # Megatron arguments that differ between levels
    config: dict  # runtime config entries that differ between levels
    source_shown: bool  # whether source_model.py is in the workspace


# Each level adds conventions to the last.
_L1 = ({"rotary_interleaved": False, "rotary_percent": 1.0, "qk_layernorm": False,
        "add_qkv_bias": False, "tensor_model_parallel_size": 1},
       {"kv_head_sharing": "repeat", "norm_weight_offset": False, "scale_embeddings": False})
_L2 = ({**_L1[0], "rotary_interleaved": True}, {**_L1[1], "kv_head_sharing": "tile"})
_L3 = ({**_L2[0], "rotary_percent": 0.5, "qk_layernorm": True, "add_qkv_bias": True},
       {**_L2[1], "norm_weight_offset": True, "scale_embeddings": True})
_L4 = ({**_L3[0], "tensor_model_parallel_size": 2}, _L3[1])
LEVELS = {1: Level(*_L1, True), 2: Level(*_L2, True), 3: Level(*_L3, True), 4: Level(*_L4, True),
          5: Level(*_L4, False)}

HEAD_LAYOUTS = [(6, 2), (8, 2), (8, 4), (12, 4)]  # (heads, kv groups); never heads == groups**2


@dataclass
class Instance:
    level: int
    seed: int
    args: dict  # megatron_args.json
    config: dict  # the runtime's config.json
    ranks: list[dict[str, np.ndarray]]  # per TP rank, bfloat16 bit patterns (uint16)

    def original(self) -> Checkpoint:
        """The original model, for data/source_model.forward."""
        return Checkpoint(self.args, [{k: bf16_to_float(v) for k, v in r.items()} for r in self.ranks])


def float_to_bf16(x: np.ndarray) -> np.ndarray:
    """float -> uint16 bfloat16 bit patterns, rounding to nearest even."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def make_instance(level: int, seed: int) -> Instance:
    if level not in LEVELS:
        raise ValueError(f"level must be one of {sorted(LEVELS)}, got {level}")
    level_args, level_config, _ = LEVELS[level]
    rng = np.random.default_rng([level, seed])
    heads, groups = HEAD_LAYOUTS[rng.integers(len(HEAD_LAYOUTS))]
    d, hidden = int(rng.choice([16, 24])), int(rng.choice([48, 64]))
    ffn, vocab = int(rng.choice([64, 96, 128])), int(rng.integers(200, 250))
    tp = level_args["tensor_model_parallel_size"]
    multiple = 128 * tp
    args = {"num_layers": 2, "hidden_size": hidden, "ffn_hidden_size": ffn,
            "num_attention_heads": heads, "group_query_attention": True,
            "num_query_groups": groups, "kv_channels": d, "normalization": "RMSNorm",
            "norm_epsilon": 1e-5, "position_embedding_type": "rope", "rotary_base": 10000,
            **level_args, "add_bias_linear": False, "swiglu": True,
            "untie_embeddings_and_output_weights": False,
            "vocab_size": vocab, "make_vocab_size_divisible_by": 128,
            "padded_vocab_size": -(-vocab // multiple) * multiple, "seq_length": SEQ_LEN,
            "max_position_embeddings": SEQ_LEN, "bf16": True,
            "transformer_impl": "transformer_engine"}
    config = {"hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": 2,
              "num_attention_heads": heads, "num_key_value_heads": groups, "head_dim": d,
              "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "partial_rotary_factor": level_args["rotary_percent"],
              "qkv_bias": level_args["add_qkv_bias"], "qk_norm": level_args["qk_layernorm"],
              **level_config}
    return Instance(level, seed, args, config, random_ranks(args, rng))


def random_ranks(args: dict, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """Random weights, laid out as each TP rank of Megatron-Core holds them."""
    tp, H, d = args["tensor_model_parallel_size"], args["hidden_size"], args["kv_channels"]
    heads, groups, ffn = args["num_attention_heads"], args["num_query_groups"], args["ffn_hidden_size"]
    qkv_rows = (heads + 2 * groups) * d // tp

    def normal(*shape: int, std: float) -> np.ndarray:
        return rng.normal(0.0, std, shape)

    def norm_weight(n: int) -> np.ndarray:
        return 1.0 + normal(n, std=0.3)

    replicated = {"decoder.final_layernorm.weight": norm_weight(H)}
    for i in range(args["num_layers"]):
        p = f"decoder.layers.{i}."
        replicated[p + "self_attention.linear_qkv.layer_norm_weight"] = norm_weight(H)
        replicated[p + "mlp.linear_fc1.layer_norm_weight"] = norm_weight(H)
        if args["qk_layernorm"]:
            replicated[p + "self_attention.q_layernorm.weight"] = norm_weight(d)
            replicated[p + "self_attention.k_layernorm.weight"] = norm_weight(d)
    ranks = []
    for _ in range(tp):
        w = dict(replicated)
        w["embedding.word_embeddings.weight"] = normal(args["padded_vocab_size"] // tp, H, std=1.0)
        for i in range(args["num_layers"]):
            p = f"decoder.layers.{i}."
            w[p + "self_attention.linear_qkv.weight"] = normal(qkv_rows, H, std=H**-0.5)
            if args["add_qkv_bias"]:
                w[p + "self_attention.linear_qkv.bias"] = normal(qkv_rows, std=0.5)
            w[p + "self_attention.linear_proj.weight"] = normal(H, heads * d // tp, std=(heads * d) ** -0.5)
            w[p + "mlp.linear_fc1.weight"] = normal(2 * ffn // tp, H, std=H**-0.5)
            w[p + "mlp.linear_fc2.weight"] = normal(H, ffn // tp, std=ffn**-0.5)
        ranks.append({k: float_to_bf16(v) for k, v in w.items()})
    return ranks


def token_sequences(vocab: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Sequences covering every token id, length 1, length SEQ_LEN and repeated tokens."""
    perm = rng.permutation(vocab)
    seqs = [perm[i:i + SEQ_LEN] for i in range(0, vocab, SEQ_LEN)]
    a, b = rng.integers(vocab, size=2)
    seqs += [rng.integers(vocab, size=1), np.full(SEQ_LEN, a), np.resize([a, b], SEQ_LEN),
             rng.integers(vocab, size=int(rng.integers(2, SEQ_LEN)))]
    return seqs


def write_workspace(workspace: str | Path, inst: Instance) -> None:
    ws = Path(workspace)
    (ws / "checkpoint").mkdir(parents=True, exist_ok=True)
    for rank, tensors in enumerate(inst.ranks):
        np.savez(ws / "checkpoint" / f"mp_rank_{rank:02d}.npz", **tensors)
    (ws / "megatron_args.json").write_text(json.dumps(inst.args, indent=2) + "\n")
    (ws / "config.json").write_text(json.dumps(inst.config, indent=2) + "\n")
    shutil.copy(DATA / "target_model.py", ws / "target_model.py")
    if LEVELS[inst.level].source_shown:
        shutil.copy(DATA / "source_model.py", ws / "source_model.py")
    else:
        rng = np.random.default_rng([inst.level, inst.seed, 1])
        vocab = inst.args["vocab_size"]
        fill = -vocab % SEQ_LEN
        tokens = np.concatenate([rng.permutation(vocab), rng.integers(vocab, size=fill)]).reshape(-1, SEQ_LEN)
        original = inst.original()
        np.savez(ws / "reference.npz", tokens=tokens, logits=np.stack([forward(original, t) for t in tokens]))


def build_prompt(level: int, max_steps: int) -> str:
    source = (
        "- source_model.py: the original model in numpy (load_checkpoint, forward).\n"
        if LEVELS[level].source_shown else
        f"- reference.npz: `tokens` (N, {SEQ_LEN}) int64 and `logits` (N, {SEQ_LEN}, vocab_size) float64, the\n"
        "  original model's logits on those sequences; together they contain every token id.\n")
    return f"""\
Port a trained language model from its training code to a serving runtime.

Your working directory holds:
- checkpoint/mp_rank_XX.npz: the original model, one file per tensor-parallel rank, saved
  by Megatron-Core with Transformer Engine layers; bfloat16 tensors are stored as their
  uint16 bit patterns.
- megatron_args.json: the arguments of the training run.
{source}- target_model.py and config.json: the serving runtime and the configuration it will
  run with (load_checkpoint, forward, expected_shapes).

Write a checkpoint for the runtime and submit it.

How the submission is graded:
- The file must be a numpy .npz archive (np.savez or np.savez_compressed, loaded with
  allow_pickle=False) of at most {MAX_SUBMISSION_BYTES >> 20} MiB, unpacked size included. It must hold
  every tensor in target_model.expected_shapes(config), at exactly that shape, with a
  floating-point dtype (float16, float32 or float64) and only finite values. Other keys are
  ignored.
- The grader loads it with its own pristine copies of target_model.py and config.json
  (changes to the copies in your working directory have no effect) and runs forward on
  token sequences drawn fresh at grading time: lengths from 1 to {SEQ_LEN}, together
  covering every token id in [0, vocab_size), including sequences of repeated tokens.
- It compares those logits with the original model's logits on the same sequences. You
  pass if the largest absolute difference, over every sequence, position and vocabulary
  entry, is at most {TOLERANCE:g}.

Tools: `python` runs code in a persistent Python process in your working directory (numpy
available, no network, {CALL_TIMEOUT_S} s per call). `submit` grades a file of your working directory: the first
file submitted ends the task, there is no second attempt. You have at most {max_steps} replies.
"""


TOOLS = [
    {"name": "python",
     "description": (
         "Run Python code in a persistent process whose working directory is the task's "
         "workspace. Variables, imports and functions persist between calls, like notebook "
         "cells; files persist too. Use print() to see values: stdout and stderr are returned, "
         f"with the traceback if the code raises; output beyond {OUTPUT_LIMIT} characters is "
         f"cut in the middle. A call that runs longer than {CALL_TIMEOUT_S} s is stopped and the "
         "process restarted: variables are lost, files remain. numpy is installed; there is "
         "no network."),
     "input_schema": {"type": "object",
                      "properties": {"code": {"type": "string", "description": "Python source to run."}},
                      "required": ["code"]}},
    {"name": "submit",
     "description": (
         "Submit the converted checkpoint for grading. The first submission is final and ends "
         "the task."),
     "input_schema": {"type": "object",
                      "properties": {"path": {"type": "string",
                                              "description": "Path of the .npz file, relative to the working directory."}},
                      "required": ["path"]}},
]


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a task instance and print its prompt.")
    parser.add_argument("--workspace", required=True, help="directory to write the instance into")
    parser.add_argument("--level", type=int, default=DEFAULT_LEVEL, choices=sorted(LEVELS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS)
    a = parser.parse_args()
    write_workspace(a.workspace, make_instance(a.level, a.seed))
    print(build_prompt(a.level, a.max_steps))


if __name__ == "__main__":
    main()
