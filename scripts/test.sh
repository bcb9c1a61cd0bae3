#!/usr/bin/env bash
# The test suite: lint, then every test (the slow ones on the real model included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The HTML report is checked in a real browser: Debian's chromium (skipped only where it is absent).
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  echo "setup: installing Debian's chromium for the report rendering test ..."
  if ! { $SUDO apt-get install -y -q chromium >/dev/null 2>&1 ||
         { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q chromium >/dev/null 2>&1; }; }; then
    if [ -n "${CI:-}" ]; then
      echo "setup: could not install chromium (apt-get install chromium); CI needs it" >&2
      exit 1
    fi
    echo "setup: could not install chromium; the report rendering test will be skipped"
  fi
fi
.venv/bin/ruff check src tests bench
exec .venv/bin/python -m pytest "$@"
