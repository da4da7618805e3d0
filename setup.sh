#!/bin/sh
# Set-up: bubblewrap (the sandbox) from Debian's packages, then the project's dependencies and test
# tools in a virtual environment: the active one if there is one, else .venv here (created with
# python3, or $PYTHON). Works as root and as a user with sudo. A user without sudo still gets the
# virtual environment when only bubblewrap is missing (offline runs work without it), and is told the
# exact line to ask an administrator for. SETUP_PLAN=1 prints what it would do, and does nothing.
set -eu
cd "$(dirname "$0")"
say() { echo "setup: $*"; }

python="${PYTHON:-$(command -v python3 || command -v python || true)}"
if [ -z "$python" ] || ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    say "needs Python 3.11 or newer as python3 (or set PYTHON=/path/to/python3.11)"
    exit 1
fi

bwrap=""  # bubblewrap, if missing: API runs need it, offline runs do not
command -v bwrap >/dev/null 2>&1 || bwrap="bubblewrap"
needed=""  # python3-venv, if missing: no virtual environment without it
if [ -n "${VIRTUAL_ENV:-}" ]; then
    venv="$VIRTUAL_ENV"
else
    venv="$(pwd)/.venv"
    # Debian's Python creates a venv only with python3-venv (ensurepip) installed.
    [ -x "$venv/bin/python" ] || "$python" -c 'import ensurepip' 2>/dev/null || needed="python3-venv"
fi
packages="$(echo $bwrap $needed)"
if [ "$(id -u)" -eq 0 ]; then sudo=""; elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; else sudo="none"; fi

without_bubblewrap() {
    say "bubblewrap is missing and you are not root and have no sudo: python main.py --offline works without it,"
    say "but runs against the API need it (or --allow-unisolated, which runs model code unisolated, as you)."
    say "Ask an administrator to run:"
    say "    apt-get update && apt-get install -y bubblewrap"
}

if [ -n "${SETUP_PLAN:-}" ]; then
    say "python: $python"
    say "venv: $venv"
    case "$sudo" in "") how="as root";; sudo) how="with sudo";; *) how="no sudo: an administrator must install them";; esac
    say "apt packages: ${packages:-none}${packages:+ ($how)}"
fi
if [ "$sudo" = none ] && [ -n "$needed" ]; then
    say "missing: $packages. You are not root and have no sudo: ask an administrator to run"
    say "    apt-get update && apt-get install -y $packages"
    say "then run sh setup.sh again."
    exit 1
fi
if [ -n "${SETUP_PLAN:-}" ]; then
    if [ "$sudo" = none ] && [ -n "$bwrap" ]; then without_bubblewrap; fi
    exit 0
fi

if [ -n "$packages" ] && [ "$sudo" != none ]; then
    say "installing $packages with apt-get${sudo:+ (through sudo)} ..."
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq $packages >/dev/null
fi
if [ ! -x "$venv/bin/python" ]; then
    say "creating the virtual environment $venv ..."
    "$python" -m venv "$venv"
fi
say "installing the project's dependencies into $venv (anthropic, numpy; pytest and ruff for the tests) ..."
"$venv/bin/python" -m pip install -q --disable-pip-version-check '.[dev]'
if [ -z "${VIRTUAL_ENV:-}" ]; then
    say "done. Now run: . .venv/bin/activate"
else
    say "done, in your virtual environment $venv."
fi
if [ "$sudo" = none ] && [ -n "$bwrap" ]; then without_bubblewrap; fi
