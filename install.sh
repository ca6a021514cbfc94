#!/usr/bin/env bash
# Set up cleanrl_pool on Debian/Ubuntu: system libraries, then a virtual environment in .venv.
set -euo pipefail
cd "$(dirname "$0")"

# System libraries: Qt 5 runtime for EnvPool's Procgen; Mesa EGL for DeepMind Control pixels
packages=(libqt5gui5 libegl1 libegl-mesa0 libgl1-mesa-dri)
python3 -c "import ensurepip, venv" 2>/dev/null || packages+=(python3-venv)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Python packages
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
