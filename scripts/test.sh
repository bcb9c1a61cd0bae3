#!/usr/bin/env bash
# The test suite: lint, then every test (the slow ones on the real model included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests bench
exec .venv/bin/python -m pytest "$@"
