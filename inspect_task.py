"""The task under Inspect AI: any model provider, Inspect's log viewer, the same instances and grader.
Inspect runs this file; it is not a program of its own:

    pip install '.[inspect]'
    inspect eval inspect_task.py -T level=7 -T seeds=0-9 --model openai/gpt-4o-mini --epochs 10 --token-limit 2m

runs 100 samples (10 seeds, 10 epochs each), each stopped at 2 million tokens (`--cost-limit` bounds each
sample's dollars instead, where Inspect knows the model's price); `--limit N` runs the first N samples.

One sample per (level, seed), built by task.py's make_instance and write_workspace and prompted
with task.py's build_prompt, the words main.py sends. The `python` and `submit` tools carry
task.TOOLS' descriptions and run in this project's own sandbox (tools.Sandbox, one worker per
sample, closed when the sample ends); grader.grade is the scorer. Nothing else in the project
imports this file or inspect_ai.
"""
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

try:
    from inspect_ai import Task, task
    from inspect_ai.dataset import MemoryDataset, Sample
    from inspect_ai.model import GenerateConfig
    from inspect_ai.scorer import Score, Target, accuracy, scorer, stderr
    from inspect_ai.solver import Generate, TaskState, solver
    from inspect_ai.tool import ToolDef, ToolError
    from inspect_ai.util import LimitExceededError
except ModuleNotFoundError:
    if __name__ != "__main__":
        raise
    sys.exit(f"{__doc__}\nInspect AI is not installed here: pip install '.[inspect]' first.")

import task as contract
from flags import DEFAULT_MAX_TOKENS
from grader import grade
from tools import Sandbox, SubmitError, bwrap_usable, take_submission

DESCRIPTIONS = {t["name"]: t for t in contract.TOOLS}


def seed_range(text: str | int) -> range:
    """'0-9' or '3' (Inspect passes -T values as strings or ints)."""
    first, _, last = str(text).partition("-")
    return range(int(first), int(last or first) + 1)


@task
def megatron_port(level: int = contract.DEFAULT_LEVEL, seeds: str = "0-9",
                  max_steps: int = contract.DEFAULT_MAX_STEPS) -> Task:
    level, max_steps = int(level), int(max_steps)
    if level not in contract.LEVELS:
        raise ValueError(f"level must be one of {sorted(contract.LEVELS)}, got {level}")
    samples = [Sample(id=f"level-{level}-seed-{seed}", input=contract.build_prompt(level, max_steps),
                      metadata={"level": level, "seed": seed}) for seed in seed_range(seeds)]
    return Task(dataset=MemoryDataset(samples), solver=port_agent(max_steps), scorer=graded(),
                config=GenerateConfig(max_tokens=DEFAULT_MAX_TOKENS))


def tool(fn, name: str) -> ToolDef:
    """A tool with task.TOOLS' description and parameter descriptions, the ones main.py sends."""
    spec = DESCRIPTIONS[name]
    params = {k: v["description"] for k, v in spec["input_schema"]["properties"].items()}
    return ToolDef(fn, name=name, description=spec["description"], parameters=params).as_tool()


@solver
def port_agent(max_steps: int):
    """The loop of main.run_agent: at most max_steps replies, each tool call answered, until a
    submission is taken or the model stops calling tools."""
    async def solve(state: TaskState, generate: Generate) -> TaskState:
        level, seed = state.metadata["level"], state.metadata["seed"]
        root = Path(tempfile.mkdtemp(prefix=f"megatron-port-L{level}-s{seed}-"))
        await asyncio.to_thread(contract.write_workspace, root / "workspace", contract.make_instance(level, seed))
        sandbox = Sandbox(root / "workspace", isolate=bwrap_usable())
        state.metadata |= {"root": str(root), "label": "max_steps"}

        async def python(code: str) -> str:
            result = await sandbox.run(code)
            if result.is_error:
                raise ToolError(result.output)
            return result.output

        async def submit(path: str) -> str:
            try:
                copy = await take_submission(sandbox, path)
            except SubmitError as e:
                raise ToolError(f"Not submitted: {e}.") from None
            state.metadata |= {"submission": str(copy), "label": "submitted"}
            if await sandbox.over_quota():
                state.metadata |= {"submission": "", "label": "disk_quota"}
            return "Submitted for grading."

        state.tools = [tool(python, "python"), tool(submit, "submit")]
        try:
            for _ in range(max_steps):
                state = await generate(state, tool_calls="single")
                if state.metadata["label"] != "max_steps":
                    break
                if sandbox.calls_over_quota >= 2:
                    state.metadata["label"] = "disk_quota"
                    break
                if not state.output.message.tool_calls:
                    state.metadata["label"] = "no_submission"
                    break
        except LimitExceededError as e:  # Inspect's --token-limit, --cost-limit, ...: the sample ends, scored 0
            state.metadata["label"] = f"{e.type}_limit"
            raise
        finally:
            await sandbox.close()  # the submitted copy stays beside the workspace until the scorer is done
            await asyncio.to_thread(shutil.rmtree, root if not state.metadata.get("submission") else root / "workspace",
                                    True)
        return state

    return solve


@scorer(metrics=[accuracy(), stderr()])
def graded():
    """grader.grade on the submitted file: 1 if it passes, else 0; the label and max error in the metadata."""
    async def score(state: TaskState, target: Target) -> Score:
        meta = state.metadata
        try:
            if not meta.get("submission"):
                label = meta.get("label", "no_submission")
                return Score(value=0, answer=label, explanation=f"no file was graded: {label}",
                             metadata={"label": label, "max_error": None})
            g = await asyncio.to_thread(grade, meta["submission"], meta["level"], meta["seed"])
        finally:
            if meta.get("root"):
                await asyncio.to_thread(shutil.rmtree, meta["root"], True)
        if g.label == "ungradable":  # the instance's fault, not the model's: an error, not a score
            raise RuntimeError(g.detail)
        return Score(value=1 if g.passed else 0, answer=g.label, explanation=g.detail,
                     metadata={"label": g.label, "max_error": g.max_error})

    return score


if __name__ == "__main__":  # `python inspect_task.py --help`: how to run it
    print(__doc__)
