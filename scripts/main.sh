#!/usr/bin/env bash
# The main job on a fresh machine: set up, then run `igpt quickstart` on Fashion-MNIST (prepare, pretrain,
# probe every layer, low-data probes, completions) into runs/quickstart/ and write runs/quickstart/report.html.
# About 30 minutes on 2 CPU cores. Running it again resumes. Extra arguments go to `igpt quickstart`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/igpt quickstart --out runs/quickstart "$@"
