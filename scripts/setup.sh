#!/usr/bin/env bash
# Set up a fresh machine for igpt: a virtual environment in .venv with the project and its dependencies
# (torch pinned to the CPU build 2.13.0), and Debian's Fashion-MNIST where apt and root are available.
# Safe to run again: it skips what is already in place.
# Usage: bash scripts/setup.sh [--test]   (--test also installs the test tools: pytest, ruff, transformers,
# selenium, and, as root with apt, Debian's chromium and chromium-driver for the browser test of igpt serve)
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$py" -m venv .venv
fi
stamp=".venv/.setup-stamp${extra:+-test}"
want="$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python dependencies (torch 2.13.0 CPU build)" >&2
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v -E "^WARNING: Location" || true
  .venv/bin/python -m pip install -q -e ".${extra}" 2>&1 | grep -v -E "^WARNING: Location" || true
  .venv/bin/python -c "import igpt, torch, numpy, PIL, safetensors, sklearn" \
    || { echo "setup: error: the Python dependencies did not install" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
fm=/usr/share/datasets/fashion-mnist
if [ ! -f "$fm/train-images-idx3-ubyte.gz" ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's dataset-fashion-mnist" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
      || echo "setup: warning: could not install dataset-fashion-mnist with apt" >&2
  fi
  if [ ! -f "$fm/train-images-idx3-ubyte.gz" ]; then
    echo "setup: note: Fashion-MNIST is not in $fm. Install Debian's package dataset-fashion-mnist" \
         "(as root: apt-get install dataset-fashion-mnist), or put the four IDX files" \
         "(train-images-idx3-ubyte.gz, ...) in a directory and pass it with --data-dir." >&2
  fi
fi
if [ -n "$extra" ] && ! { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's chromium and chromium-driver (browser test of igpt serve)" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
      || echo "setup: warning: could not install chromium with apt; the browser test will be skipped" >&2
  else
    echo "setup: note: without chromium and chromedriver the browser test of igpt serve is skipped" >&2
  fi
fi
