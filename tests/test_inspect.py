"""The task under Inspect AI, driven offline by Inspect's mockllm through scripted tool calls."""
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import bz2_bomb

inspect_ai = pytest.importorskip("inspect_ai", reason="the optional extra: pip install '.[inspect]'")
from inspect_ai import eval as inspect_eval
from inspect_ai.log import read_eval_log
from inspect_ai.model import ModelOutput, ModelUsage

import task
from inspect_task import megatron_port

ROOT = Path(__file__).resolve().parents[1]
CONVERSIONS = (ROOT / "conversions.py").read_text()


def counted(output: ModelOutput) -> ModelOutput:
    """With its usage given, mockllm does not count tokens with tiktoken (which would download an encoding)."""
    output.usage = ModelUsage(input_tokens=100, output_tokens=10, total_tokens=110)
    return output


def calls(*steps: tuple[str, dict]) -> list:
    return [counted(ModelOutput.for_tool_call("mockllm/model", name, args)) for name, args in steps]


def convert(mistake: str | None) -> tuple[str, dict]:
    code = f"{CONVERSIONS}\nconvert_workspace('converted.npz', mistake={mistake!r})\nprint('wrote converted.npz')"
    return "python", {"code": code}


def test_the_inspect_task_grades_with_the_projects_grader(tmp_path):
    outputs = [*calls(convert(None), ("submit", {"path": "converted.npz"})),  # seed 0: the reference conversion
               *calls(convert("gate_up_order"), ("submit", {"path": "converted.npz"})),  # seed 1: a wrong one
               *calls(("submit", {"path": "../escape.npz"}),  # seed 2: refused (not a submission), then nothing
                      ("python", {"code": "print(1)"})),
               counted(ModelOutput.from_content("mockllm/model", "I give up."))]
    [log] = inspect_eval(megatron_port(level=1, seeds="0-2"), model="mockllm/model",
                         model_args={"custom_outputs": outputs}, max_samples=1, log_dir=str(tmp_path),
                         display="none")
    assert log.status == "success", log.error
    read = read_eval_log(log.location, resolve_attachments=True)
    by_id = {s.id: s for s in read.samples}
    scores = {k: (s.scores["graded"].value, s.scores["graded"].metadata["label"]) for k, s in by_id.items()}
    assert scores == {"level-1-seed-0": (1, "pass"), "level-1-seed-1": (0, "gate_up_order"),
                      "level-1-seed-2": (0, "no_submission")}
    assert by_id["level-1-seed-0"].scores["graded"].metadata["max_error"] < task.TOLERANCE
    refused = [m for m in by_id["level-1-seed-2"].messages if m.role == "tool" and m.function == "submit"]
    assert refused and "outside the working directory" in str(refused[0].error.message)
    first = by_id["level-1-seed-0"]
    assert first.input == task.build_prompt(1, task.DEFAULT_MAX_STEPS)  # the words main.py sends
    assert read.results.scores[0].metrics["accuracy"].value == pytest.approx(1 / 3)
    model_calls = [e for e in first.events if e.event == "model"]
    sent = {t.name: t.description for t in model_calls[0].tools}
    assert sent == {t["name"]: t["description"] for t in task.TOOLS}  # the same tools, limits stated alike
    assert not list(Path(tempfile.gettempdir()).glob("megatron-port-L1-s[0-2]-*"))  # every workspace removed


def test_a_sample_stopped_by_an_inspect_limit_is_labelled_so(tmp_path):
    """--token-limit (and Inspect's other limits) bound what a sample may spend: it ends there, scored 0."""
    [log] = inspect_eval(megatron_port(level=1, seeds="0"), model="mockllm/model", log_dir=str(tmp_path),
                         model_args={"custom_outputs": calls(convert(None), ("submit", {"path": "converted.npz"}))},
                         token_limit=150, display="none")  # each scripted reply counts 110 tokens
    [sample] = read_eval_log(log.location).samples
    assert sample.limit.type == "token" and sample.scores["graded"].value == 0
    assert sample.scores["graded"].metadata["label"] == "token_limit"


@pytest.mark.parametrize("hide", ["", "import sys; sys.modules['inspect_ai'] = None; "], ids=["extra", "no-extra"])
def test_python_inspect_task_help_says_how_to_run_it(hide):
    """With the extra, and without it (hidden from the import system): the usage, never a traceback."""
    run = f"{hide}import runpy; runpy.run_path('inspect_task.py', run_name='__main__')"
    r = subprocess.run([sys.executable, "-c", run, "--help"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert "inspect eval inspect_task.py" in r.stdout + r.stderr and "Traceback" not in r.stderr
    assert (r.returncode, "pip install '.[inspect]' first" in r.stderr) == ((0, False) if not hide else (1, True))


def test_the_inspect_scorer_fails_a_decompression_bomb(tmp_path):
    """The 2 KiB bz2 bomb (3 GiB inflated) written and submitted: a scored failure with its label."""
    write = f"open('bomb.npz', 'wb').write(bytes.fromhex({bz2_bomb().hex()!r}))"
    outputs = calls(("python", {"code": write}), ("submit", {"path": "bomb.npz"}))
    [log] = inspect_eval(megatron_port(level=1, seeds="0"), model="mockllm/model",
                         model_args={"custom_outputs": outputs}, log_dir=str(tmp_path), display="none")
    assert log.status == "success", log.error
    [sample] = read_eval_log(log.location).samples
    score = sample.scores["graded"]
    assert (score.value, score.metadata["label"]) == (0, "unreadable") and "zip method 12" in score.explanation
