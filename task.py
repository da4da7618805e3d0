"""The task: port a Megatron-Core parallel checkpoint to a Hugging Face-style runtime.

This file is the task's contract: the level presets, the instance generator, the prompt,
the tool schemas and the sandbox limits they state. `python task.py --workspace DIR` writes
an instance to try by hand.
"""
import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from data.megatron_checkpoint import Files, optimizer_files, random_files, to_bf16
from data.source_model import Checkpoint, bf16_to_float, forward, linear_attention, rank_file

DATA = Path(__file__).parent / "data"
TOLERANCE = 1e-4  # max |logit difference| that passes
MAX_SUBMISSION_BYTES = 64 * 2**20  # archive size, and again its unpacked size
SEQ_LEN = 32  # longest sequence the grader runs
DEFAULT_LEVEL = 7
DEFAULT_MAX_STEPS = 40  # model replies per run, stated in the prompt
ROUTING_MARGIN = 1e-3  # a graded sequence's routing stays this far from a tie, so float32 rounding cannot flip it
ROUTING_REDRAWS = 20
# The sandbox's limits, stated in the tool description and enforced by tools.py.
CALL_TIMEOUT_S = 60
OUTPUT_LIMIT = 10_000  # bytes of output, and again characters of error message, returned per call
MEMORY_BYTES = 4 * 2**30  # per worker with all its processes (cgroup), and per process (address space)
CPU_SECONDS = 900  # over the worker's lifetime
MAX_PROCESSES = 64
WORKSPACE_QUOTA_BYTES = 2**30  # disk used by a run's workspace
MAX_WORKSPACE_ENTRIES = 20_000  # files and directories; more counts as over the quota
QUOTA_TEXT = f"{WORKSPACE_QUOTA_BYTES >> 30} GiB ({MAX_WORKSPACE_ENTRIES} files)"


class Level(NamedTuple):
    args: dict  # Megatron arguments that differ between levels
    config: dict  # runtime config entries that differ between levels
    shown: str  # what the workspace holds to check against: "source", "reference" or "nothing"


# Each level adds conventions to the last.
_L1 = ({"num_layers": 2, "rotary_interleaved": False, "rotary_percent": 1.0, "qk_layernorm": False,
        "add_qkv_bias": False, "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
        "virtual_pipeline_model_parallel_size": None, "expert_model_parallel_size": 1, "num_experts": None,
        "moe_layer_freq": 1, "layernorm_zero_centered_gamma": False, "untie_embeddings_and_output_weights": False,
        "use_distributed_optimizer": False, "experimental_attention_variant": None, "attention_output_gate": False},
       {"kv_head_sharing": "repeat", "norm_weight_offset": False, "scale_embeddings": False})
_L2 = ({**_L1[0], "rotary_interleaved": True}, {**_L1[1], "kv_head_sharing": "tile"})
_L3 = ({**_L2[0], "rotary_percent": 0.5, "qk_layernorm": True, "add_qkv_bias": True},
       {**_L2[1], "norm_weight_offset": True, "scale_embeddings": True})
_L4 = ({**_L3[0], "tensor_model_parallel_size": 2}, _L3[1])
_L6 = ({**_L4[0], "num_layers": 4, "pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2,
        "layernorm_zero_centered_gamma": True, "untie_embeddings_and_output_weights": True}, _L4[1])
_L7 = ({**_L6[0], "expert_model_parallel_size": 2, "num_experts": 4, "moe_layer_freq": [0, 1, 1, 1],
        "moe_router_topk": 2, "moe_router_pre_softmax": False, "moe_router_score_function": "softmax",
        "moe_grouped_gemm": True, "moe_use_legacy_grouped_gemm": True, "moe_shared_expert_gate": True}, _L4[1])
_L8 = ({**_L7[0], "use_distributed_optimizer": True}, _L4[1])
_L10 = ({**_L8[0], "experimental_attention_variant": "gated_delta_net", "linear_attention_freq": 4, "linear_conv_kernel_dim": 4,
         "attention_output_gate": True, "linear_num_key_heads": 4, "linear_num_value_heads": 8}, {**_L4[1], "attn_output_gate": True})
LEVELS = {1: Level(*_L1, "source"), 2: Level(*_L2, "source"), 3: Level(*_L3, "source"), 4: Level(*_L4, "source"),
          5: Level(*_L4, "reference"), 6: Level(*_L6, "reference"), 7: Level(*_L7, "reference"),
          8: Level(*_L8, "reference"), 9: Level(*_L8, "nothing"), 10: Level(*_L10, "reference"), 11: Level(*_L10, "nothing")}

HEAD_LAYOUTS = [(6, 2), (8, 2), (8, 4), (12, 4)]  # (heads, kv groups); never heads == groups**2
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
        """The original model for source_model.forward: the fp32 main parameters if any, else the bf16 weights."""
        files = self.main or {r: {k: bf16_to_float(v) for k, v in f.items() if v.dtype == np.uint16}
                              for r, f in self.files.items()}
        return Checkpoint(self.args, {r: {k: v.astype(np.float64) for k, v in f.items()} for r, f in files.items()})


def make_instance(level: int, seed: int) -> Instance:
    if level not in LEVELS:
        raise ValueError(f"level must be one of {sorted(LEVELS)}, got {level}")
    level_args, level_config, _ = LEVELS[level]
    rng = np.random.default_rng([level, seed])
    heads, groups = HEAD_LAYOUTS[rng.integers(len(HEAD_LAYOUTS))]
    d, hidden = int(rng.choice([16, 24])), int(rng.choice([48, 64]))
    ffn, vocab = int(rng.choice([64, 96, 128])), int(rng.integers(200, 250))
    tp, pp, layers = (level_args[k] for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "num_layers"))
    world = tp * pp * level_args["expert_model_parallel_size"]  # expert data-parallel size 1
    args = {"hidden_size": hidden, "ffn_hidden_size": ffn, "num_attention_heads": heads, "group_query_attention": True,
            "num_query_groups": groups, "kv_channels": d, "normalization": "RMSNorm", "layernorm_epsilon": 1e-5,
            "position_embedding_type": "rope", "rotary_base": 10000, **level_args, "expert_tensor_parallel_size": tp,
            "add_bias_linear": False, "swiglu": True, "vocab_size": vocab, "make_vocab_size_divisible_by": 128,
            "padded_vocab_size": -(-vocab // (128 * tp)) * 128 * tp, "seq_length": SEQ_LEN,
            "max_position_embeddings": SEQ_LEN, "bf16": True, "transformer_impl": "transformer_engine",
            "world_size": world, "data_parallel_size": world // (tp * pp), "ckpt_format": "torch",
            "optimizer": "adam", "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_eps": 1e-8,
            "accumulate_allreduce_grads_in_fp32": True, "overlap_grad_reduce": False, "overlap_param_gather": False}
    config = {"hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": groups, "head_dim": d, "vocab_size": vocab,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "partial_rotary_factor": level_args["rotary_percent"],
              "qkv_bias": level_args["add_qkv_bias"], "qk_norm": level_args["qk_layernorm"],
              "tie_word_embeddings": not level_args["untie_embeddings_and_output_weights"], **level_config}
    if args["num_experts"]:
        # Expert ffn = tp * hidden keeps each rank's per-expert blocks square, so shapes show no orientation.
        args |= {"moe_ffn_hidden_size": tp * hidden, "moe_shared_expert_intermediate_size": ffn,
                 "moe_router_topk_scaling_factor": float(rng.choice([1.5, 2.0, 2.5, 3.0]))}
        config |= {"num_experts": args["num_experts"], "num_experts_per_tok": args["moe_router_topk"],
                   "moe_intermediate_size": tp * hidden, "shared_expert_intermediate_size": ffn, "norm_topk_prob": True,
                   "mlp_only_layers": [i for i in range(layers) if not args["moe_layer_freq"][i]]}
    if args["experimental_attention_variant"]:  # key and value head sizes differ, so no layout hides
        args |= {"linear_key_head_dim": int(rng.choice([8, 16])), "linear_value_head_dim": 12}
        config |= {k: v for k, v in args.items() if k.startswith("linear_") and k != "linear_attention_freq"}
        config["layer_types"] = ["linear_attention" if linear_attention(args, i) else "full_attention" for i in range(layers)]
    values = random_files(args, rng)
    args["train_iters"] = int(rng.choice(ITERATIONS))  # the checkpoint is the one saved at the end
    if not args["use_distributed_optimizer"]:
        return Instance(level, seed, args, config, to_bf16(values), {}, {})
    main = {r: {k: v.astype(np.float32) for k, v in f.items() if v.dtype != np.uint8} for r, f in values.items()}
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


def build_prompt(level: int, max_steps: int | None, graded_file: str | None = None) -> str:
    """The prompt for our agent loop (a submit tool, max_steps replies), or, given graded_file,
    for a harness without a submit tool (Harbor), where that file is graded when the agent stops."""
    args, shown = LEVELS[level].args, LEVELS[level].shown
    pp, ep = args["pipeline_model_parallel_size"] > 1, args["expert_model_parallel_size"] > 1
    rank = "mp_rank_TT" + "_PPP" * pp + "_EEE" * ep
    kinds = ["tensor", *["pipeline"] * pp, *["expert"] * ep]
    ranks = ("-, ".join(kinds[:-1]) + "- and " if len(kinds) > 1 else "") + kinds[-1] + "-parallel rank"
    optimizer = ("\n  Beside each, distrib_optim.npz: the distributed optimizer's saved parameter state, a\n"
                 "  nested object flattened to keys joined with \"/\" (list entries by index, None entries\n"
                 "  left out). The original model is the one whose weights are the fp32 main parameters\n"
                 "  held in that state, not the bfloat16 weights; "
                 f"{'reference.npz and grading use' if shown == 'reference' else 'grading uses'} it.\n"
                 if args["use_distributed_optimizer"] else "\n")
    routing = (f"\n- A sequence on which the original model's choice of experts for some token comes within\n"
               f"  {ROUTING_MARGIN:g} of a tie (in router logits) is redrawn with its tokens reordered (up to\n"
               f"  {ROUTING_REDRAWS} times, then left out), so no comparison hinges on a tie."
               if args["num_experts"] else "")
    source = {
        "source": "- source_model.py (and source_gdn.py, which it imports): the original model in numpy\n"
                  "  (load_checkpoint, forward).\n",
        "reference": f"- reference.npz: `tokens` (N, {SEQ_LEN}) int64 and `logits` (N, {SEQ_LEN}, vocab_size) float64, "
                     "the\n  original model's logits on those sequences; together they contain every token id.\n",
        "nothing": "- No reference.npz and no source_model.py: nothing here shows the original model's\n"
                   "  outputs, so check your conversion by reasoning about the files.\n"}[shown]
    if graded_file is None:
        goal = "Write a checkpoint for the runtime and submit it."
        tools = f"""\
Tools: `python` runs code in a persistent Python process in your working directory (numpy
available, no network, {CALL_TIMEOUT_S} s per call). `submit` grades a file of your working directory: the first
file submitted ends the task, there is no second attempt. You have at most {max_steps} replies."""
    else:
        goal = f"Write a checkpoint for the runtime to {graded_file}."
        tools = f"""\
Work in your working directory (python3 with numpy installed, no network). When you stop,
{graded_file} as it is then is graded, once; there is no other submission."""
    return f"""\
Port a trained language model from its training code to a serving runtime.

Your working directory holds:
- checkpoint/: the original model as Megatron-Core (Transformer Engine layers) saved it at
  the end of training: latest_checkpointed_iteration.txt and, for each
  {ranks}, iter_NNNNNNN/{rank}/model_optim_rng.npz with that
  rank's model weights.{optimizer}\
  Megatron saves with torch.save; here each file is an .npz archive, and bfloat16 tensors
  are stored as their uint16 bit patterns.
- megatron_args.json: the arguments of the training run.
{source}- target_model.py and config.json: the serving runtime and the configuration it will
  run with (load_checkpoint, forward, expected_shapes).

{goal}

How the submission is graded:
- The file must be a numpy .npz archive (np.savez or np.savez_compressed: members stored or
  deflated; loaded with allow_pickle=False) of at most {MAX_SUBMISSION_BYTES >> 20} MiB, unpacked size included.
  It must hold every tensor in target_model.expected_shapes(config), at exactly that shape,
  with a floating-point dtype (float16, float32 or float64) and only finite values. Other
  keys are ignored.
- The grader loads it with its own pristine copies of target_model.py and config.json
  (changes to the copies in your working directory have no effect) and runs forward on
  token sequences drawn at grading time, seeded by the submitted file's bytes (the same file
  always gets the same grade): lengths from 1 to {SEQ_LEN}, together covering every token id
  in [0, vocab_size), including sequences of repeated tokens.
- It compares those logits with the original model's logits on the same sequences. You
  pass if the largest absolute difference, over every sequence, position and vocabulary
  entry, is at most {TOLERANCE:g}.{routing}

{tools}
"""


TOOLS = [
    {"name": "python",
     "description": (
         "Run Python code in a persistent process whose working directory is the task's workspace. Variables, "
         "imports and functions persist between calls, like notebook cells; files persist too. Use print() to see "
         "values: stdout and stderr are returned, with the traceback if the code raises; output beyond "
         f"{OUTPUT_LIMIT} bytes (and an error message beyond {OUTPUT_LIMIT} characters) is cut in the middle. A call "
         f"that runs longer than {CALL_TIMEOUT_S} s is stopped and the process restarted: variables are lost, files "
         f"remain. The working directory may hold at most {QUOTA_TEXT}: a call that grows it past that is stopped, "
         "and if it is still over after your next call, or when you submit, the task ends as failed. The process "
         f"and everything it starts may use {MEMORY_BYTES >> 30} GiB of memory and {MAX_PROCESSES} processes in all, "
         f"and each process {CPU_SECONDS} s of CPU time. numpy is installed; there is no network."),
     "input_schema": {"type": "object", "required": ["code"],
                      "properties": {"code": {"type": "string", "description": "Python source to run."}}}},
    {"name": "submit",
     "description": (
         "Submit the converted checkpoint for grading. The first submission is final and ends the task. A path "
         "that is refused (not found, not a regular file, outside the working directory) is not a submission: the "
         "task goes on and you may submit again."),
     "input_schema": {"type": "object", "required": ["path"], "properties": {"path": {
         "type": "string", "description": "Path of the .npz file, relative to the working directory."}}}},
]


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a task instance and print its prompt.")
    parser.add_argument("--workspace", required=True, help="directory to write the instance into")
    parser.add_argument("--level", type=int, default=DEFAULT_LEVEL, choices=sorted(LEVELS))
    parser.add_argument("--seed", type=non_negative, default=0)
    parser.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS)
    parser.add_argument("--replace", action="store_true", help="clear a workspace that already holds files")
    a = parser.parse_args()
    if any(Path(a.workspace).glob("*")) and not a.replace:  # a stale reference.npz or iter_* would mislead
        parser.error(f"--workspace {a.workspace} already holds files; pass --replace to clear it first")
    shutil.rmtree(a.workspace, ignore_errors=True)
    write_workspace(a.workspace, make_instance(a.level, a.seed))
    print(build_prompt(a.level, a.max_steps))


def non_negative(text: str) -> int:  # argparse type for seeds
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return int(text)


if __name__ == "__main__":
    main()
