#!/usr/bin/env bash
# The main job on a fresh machine: set up, then prepare Fashion-MNIST (28x28, 16 grey levels) and print its
# summary. Extra arguments are passed to `igpt prepare`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/igpt prepare fashion-mnist --out runs/fashion-mnist-28 --resolution 28 --clusters 16 "$@"
