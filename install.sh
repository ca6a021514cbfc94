#!/usr/bin/env bash
# Set up cleanrl_pool on Debian/Ubuntu: system packages, a virtual environment in .venv, and
# Procgen-HD built from the authors' fork (procgen_hd/, source from $PROCGEN_HD_SOURCE or GitHub).
set -euo pipefail
cd "$(dirname "$0")"

# System packages: Qt 5 (EnvPool's Procgen runtime, Procgen-HD's build), the C++ build tools,
# git to fetch the fork when no PROCGEN_HD_SOURCE is given, Mesa EGL for DeepMind Control pixels
packages=(libqt5gui5 qtbase5-dev cmake make g++ libegl1 libegl-mesa0 libgl1-mesa-dri)
[ -n "${PROCGEN_HD_SOURCE:-}" ] || packages+=(git)
python3 -c "import ensurepip, venv" 2>/dev/null || packages+=(python3-venv)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if ! command -v apt-get >/dev/null; then
    echo "error: install these packages first (no apt-get here): ${missing[*]}" >&2; exit 2
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Python packages
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt

# Procgen-HD: build libenv (skipped when up to date), then install the package into .venv
.venv/bin/python procgen_hd/build_libenv.py
installed=$(.venv/bin/python -c "import os, procgen_hd; print(os.path.dirname(procgen_hd.__file__))" 2>/dev/null || true)
if [ -z "$installed" ] || ! diff -rq procgen_hd/src/procgen_hd "$installed" -x __pycache__ >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q ./procgen_hd
fi
