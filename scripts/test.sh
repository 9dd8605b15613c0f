#!/usr/bin/env bash
# The test suite on a fresh machine: set up (with the test tools), then run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
.venv/bin/python -m pytest tests "$@"
