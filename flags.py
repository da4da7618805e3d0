"""The sweep's flags: parsing and checking them, and restoring a sweep's saved ones for --resume."""
import argparse
import json
import math
import os
import sys
from datetime import datetime
from pathlib import Path

import task
from records import RESULTS, task_version

# What config.json saves and --resume restores; --max-cost and --confirm alone may be given anew beside --resume.
SWEEP_FLAGS = ("model", "levels", "runs", "seed", "max_steps", "max_tokens", "thinking", "offline", "max_cost",
               "find_band", "confirm")
ANEW = {"max_cost", "confirm"}
DEFAULT_MODEL = "claude-haiku-4-5"
DEFAULT_RUNS = 10
DEFAULT_CONCURRENCY = 10
DEFAULT_MAX_TOKENS = 16_000  # per reply: room for a long script plus its explanation
MAX_OUTPUT_TOKENS = 64_000  # claude-haiku-4-5's output limit: the largest --max-tokens the API accepts
DEFAULT_MAX_COST = 6.0  # USD for the whole sweep, the runs a --resume keeps included; covers the default command
UNSET = object()  # a flag not given on the command line
DESCRIPTION = """Measure a model's pass rate on the task: N runs at once, each graded, every transcript kept.

    python main.py --offline          # no key: scripted replies through the real loop
    python main.py --runs 10          # claude-haiku-4-5 through the Anthropic API
    python main.py --find-band        # search the levels for one it passes 10-40% of the time
"""


def restore(p: argparse.ArgumentParser, opts: argparse.Namespace, given: set[str]) -> None:
    """Take the sweep's saved flags from its config.json. A flag given again must agree with the
    saved one, except --max-cost and --confirm, which are replaced (--confirm turns a search that met the criterion
    into one that goes on until an interval settles); a key missing from the file gets its default."""
    try:
        saved = json.loads((opts.resume / "config.json").read_text())
    except (OSError, ValueError) as e:
        p.error(f"--resume {opts.resume}: cannot read its config.json ({e})")
    if not isinstance(saved, dict):
        p.error(f"--resume {opts.resume}: its config.json is not a JSON object")
    if saved.get("task_version") != task_version():
        p.error(f"--resume {opts.resume}: its runs were made with other task code (task_version "
                f"{saved.get('task_version')!r}, now {task_version()!r}), so they would not compare; start a new sweep")
    if "out" in given:
        p.error("--resume DIR writes into DIR: drop --out")
    missing = [k for k in SWEEP_FLAGS if k not in saved]
    if missing:
        print(f"--resume {opts.resume}: config.json has no {', '.join(missing)}; using the default", file=sys.stderr)
    values = {k: saved.get(k, p.get_default(k)) for k in SWEEP_FLAGS}
    values["levels"] = values["levels"] or [task.DEFAULT_LEVEL]
    given = given | {"levels"} if "level" in given else given  # --level N stands for --levels N
    differ = [k for k in given & set(SWEEP_FLAGS) - ANEW if getattr(opts, k) != values[k]]
    if differ:
        p.error(f"--resume {opts.resume} runs the saved sweep; these flags differ from it: "
                + ", ".join(f"--{k.replace('_', '-')} (saved {values[k]!r})" for k in differ)
                + ". Drop them, or start a new sweep.")
    vars(opts).update(values, **{k: getattr(opts, k) for k in ANEW & given}, out=opts.resume)


def parse_levels(text: str) -> list[int]:
    """'4-6' or '6,4,4' -> [4, 5, 6] or [4, 6]."""
    try:
        if "-" in text:
            first, last = (int(x) for x in text.split("-", 1))
            levels = list(range(first, last + 1))
        else:
            first, last, levels = 0, 0, [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"levels are A-B or A,B,...; got {text!r}")
    if first > last:
        raise argparse.ArgumentTypeError(f"A-B goes from the lower level to the higher; got {text!r} "
                                         f"(did you mean {last}-{first}?)")
    return check_levels(levels, text)


def check_levels(levels, text: str | None = None) -> list[int]:
    """The one place levels are validated: a non-empty list of known levels, sorted, each once."""
    if not isinstance(levels, list) or not levels or any(lv not in task.LEVELS for lv in levels):
        raise argparse.ArgumentTypeError(f"levels must lie in {min(task.LEVELS)}-{max(task.LEVELS)}; "
                                         f"got {text if text is not None else levels!r}")
    return sorted(set(levels))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="main.py", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=DEFAULT_RUNS, help=f"runs per level (default {DEFAULT_RUNS})")
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                   help=f"runs at once (default {DEFAULT_CONCURRENCY})")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"default {DEFAULT_MODEL}")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--level", type=int, choices=sorted(task.LEVELS),
                       help=f"difficulty, 1 (easiest) to {max(task.LEVELS)} (default {task.DEFAULT_LEVEL})")
    which.add_argument("--levels", type=parse_levels, help="a sweep over levels, A-B or A,B,...; runs interleaved")
    p.add_argument("--seed", type=task.non_negative, default=0,
                   help="base instance seed; run i of a level uses seed + i (default 0)")
    p.add_argument("--max-steps", type=int, default=task.DEFAULT_MAX_STEPS,
                   help=f"model replies per run (default {task.DEFAULT_MAX_STEPS})")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"max_tokens per reply (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--thinking", type=int, default=0, metavar="TOKENS",
                   help="extended thinking with this budget per reply, at least 1024 and below --max-tokens "
                        "(default 0: off)")
    p.add_argument("--max-cost", type=non_negative_usd, default=DEFAULT_MAX_COST,
                   help=f"USD for the whole sweep: no request is sent once the spend reaches it, so it is passed by at "
                        f"most the requests in flight; 0 for no cap (default {DEFAULT_MAX_COST:g})")
    p.add_argument("--find-band", action="store_true",
                   help="search the levels for one the model passes 10-40%% of the time, starting at level "
                        f"{task.DEFAULT_LEVEL} and spending its runs where the band is (instead of --level/--levels/--runs)")
    p.add_argument("--confirm", action="store_true",
                   help="with --find-band: go on until the level's 95%% interval lies inside the band, not only its rate "
                        "over 10 graded runs")
    p.add_argument("--out", type=Path, help="output directory (default runs/<timestamp>-<4 hex digits>/)")
    p.add_argument("--resume", type=Path, metavar="DIR",
                   help=f"finish the sweep in DIR with its saved flags, keeping the passes and fails in its {RESULTS} "
                        "(other runs start over; a search makes fresh runs instead); only --max-cost and --confirm "
                        "may be given anew")
    p.add_argument("--offline", action="store_true",
                   help="no API key: scripted replies submit the reference and every known wrong conversion")
    p.add_argument("--allow-unisolated", action="store_true",
                   help="against the API, run model code as plain processes when bubblewrap cannot isolate it "
                        "(refused by default; --offline always may)")
    p.add_argument("--keep-workspaces", action="store_true",
                   help="keep each run's workspace and, offline, its scripted submission (by default removed when "
                        "the run ends; the transcript and a model's submitted file stay)")
    p.add_argument("--verbose", action="store_true", help="print every tool call as it happens")
    flags = (*SWEEP_FLAGS, "level", "out")
    opts = p.parse_args(argv, argparse.Namespace(**dict.fromkeys(flags, UNSET)))  # argparse keeps what is set
    given = {k for k in flags if getattr(opts, k) is not UNSET}
    vars(opts).update({k: p.get_default(k) for k in flags if k not in given})
    if opts.find_band and not opts.resume and given & {"level", "levels", "runs"}:
        p.error("--find-band chooses its own levels and runs: drop --level, --levels and --runs")
    if opts.level is not None:
        opts.levels = [opts.level]
    if opts.resume:
        restore(p, opts, given)
    if opts.confirm and not opts.find_band:
        p.error("--confirm goes with --find-band")
    opts.levels = sorted(task.LEVELS) if opts.find_band else opts.levels or [task.DEFAULT_LEVEL]  # the ladder searched
    try:
        for flag in ("runs", "concurrency", "max_steps", "max_tokens"):
            if getattr(opts, flag) < 1:
                p.error(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(opts, flag)}")
        if opts.max_tokens > MAX_OUTPUT_TOKENS:
            p.error(f"--max-tokens must be at most {MAX_OUTPUT_TOKENS}, the model's output limit; got {opts.max_tokens}")
        opts.levels = check_levels(opts.levels)
        if opts.seed < 0:
            p.error(f"--seed must be non-negative, got {opts.seed}")
    except (TypeError, argparse.ArgumentTypeError) as e:
        p.error(f"--resume {opts.resume}: config.json holds a value that is not valid ({e})" if opts.resume else
                f"--levels: {e}")
    if opts.thinking and not 1024 <= opts.thinking < opts.max_tokens:  # what the Messages API accepts
        p.error(f"--thinking must be at least 1024 and below --max-tokens ({opts.max_tokens}), or 0 for off")
    if opts.out is None:  # unique even for two sweeps started in the same second
        opts.out = Path("runs") / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
    elif not opts.resume and opts.out.exists() and (not opts.out.is_dir() or any(opts.out.iterdir())):
        p.error(f"--out {opts.out} already holds files: give a new directory, or --resume {opts.out} to finish "
                "the sweep there")
    return opts


def non_negative_usd(text: str) -> float:  # argparse type for --max-cost
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of dollars, 0 or more; got {text!r}")
    return value
