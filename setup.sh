#!/bin/sh
# Set-up: bubblewrap (the sandbox) from Debian's packages, then the project's dependencies and
# test tools into the Python that runs this (PYTHON, by default python, else python3).
set -eu
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq bubblewrap >/dev/null
fi
"${PYTHON:-$(command -v python || command -v python3)}" -m pip install -q '.[dev]'
