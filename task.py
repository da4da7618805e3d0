"""The task: port a Megatron-Core parallel checkpoint to a Hugging Face-style runtime.

This file is the task's contract: the prompt, the tool schemas and the sandbox limits they
state; the levels and instances it poses are in instances.py. `python task.py --workspace DIR` writes
an instance to try by hand.
"""
import argparse
import shutil
from pathlib import Path

from instances import LEVELS, ROUTING_MARGIN, ROUTING_REDRAWS, SEQ_LEN, make_instance, write_workspace

TOLERANCE = 1e-4  # max |logit difference| that passes
MAX_SUBMISSION_BYTES = 64 * 2**20  # archive size, and again its unpacked size
DEFAULT_LEVEL = 7
DEFAULT_MAX_STEPS = 40  # model replies per run, stated in the prompt
# The sandbox's limits, stated in the tool description and enforced by tools.py.
CALL_TIMEOUT_S = 60
OUTPUT_LIMIT = 10_000  # bytes of output, and again characters of error message, returned per call
MEMORY_BYTES = 4 * 2**30  # per worker with all its processes (cgroup), and per process (address space)
CPU_SECONDS = 900  # over the worker's lifetime
MAX_PROCESSES = 64
WORKSPACE_QUOTA_BYTES = 2**30  # disk used by a run's workspace
MAX_WORKSPACE_ENTRIES = 20_000  # files and directories; more counts as over the quota
QUOTA_TEXT = f"{WORKSPACE_QUOTA_BYTES >> 30} GiB ({MAX_WORKSPACE_ENTRIES} files)"


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
               f"  {ROUTING_MARGIN:g} of a tie (in the router scores that choose them) is redrawn with its\n"
               f"  tokens reordered (up to {ROUTING_REDRAWS} times, then left out), so no comparison hinges on a tie."
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
    parser.add_argument("--level", type=int, default=DEFAULT_LEVEL, choices=sorted(LEVELS),
                        help=f"the features in play (default {DEFAULT_LEVEL}; docs/levels.md)")
    parser.add_argument("--seed", type=non_negative, default=0, help="draws the level's conventions and weights (default 0)")
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
