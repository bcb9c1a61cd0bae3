#!/usr/bin/env bash
# The demo: continued pretraining of the embedded default model on a sample of the Python docs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lorafit train configs/demo.yaml --out runs/demo --overwrite "$@"
