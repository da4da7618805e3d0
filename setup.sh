#!/bin/sh
# Set-up: bubblewrap (the sandbox) from Debian's packages, then the project's dependencies and test
# tools in a virtual environment: the active one if there is one, else .venv here (created with
# python3, or $PYTHON). Works as root, as a user with sudo, and tells a user without sudo exactly
# what to ask an administrator for. SETUP_PLAN=1 prints what it would do, and does nothing.
set -eu
cd "$(dirname "$0")"
say() { echo "setup: $*"; }

python="${PYTHON:-$(command -v python3 || command -v python || true)}"
if [ -z "$python" ] || ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    say "needs Python 3.11 or newer as python3 (or set PYTHON=/path/to/python3.11)"
    exit 1
fi

packages=""
command -v bwrap >/dev/null 2>&1 || packages="bubblewrap"
if [ -n "${VIRTUAL_ENV:-}" ]; then
    venv="$VIRTUAL_ENV"
else
    venv="$(pwd)/.venv"
    # Debian's Python creates a venv only with python3-venv (ensurepip) installed.
    [ -x "$venv/bin/python" ] || "$python" -c 'import ensurepip' 2>/dev/null || packages="$packages python3-venv"
fi
packages="${packages# }"
if [ "$(id -u)" -eq 0 ]; then sudo=""; elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; else sudo="none"; fi

if [ -n "${SETUP_PLAN:-}" ]; then
    say "python: $python"
    say "venv: $venv"
    case "$sudo" in "") how="as root";; sudo) how="with sudo";; *) how="no sudo: an administrator must install them";; esac
    say "apt packages: ${packages:-none}${packages:+ ($how)}"
    exit 0
fi

if [ -n "$packages" ]; then
    if [ "$sudo" = none ]; then
        say "missing: $packages. You are not root and have no sudo: ask an administrator to run"
        say "    apt-get update && apt-get install -y $packages"
        say "then run sh setup.sh again."
        exit 1
    fi
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
