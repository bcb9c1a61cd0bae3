#!/usr/bin/env bash
# The GPU checks, in one prepared run on a CUDA machine (under 8 minutes on one H200):
# fp16, bf16 (and a 1B Llama-shaped model, with gradient checkpointing), 4-bit QLoRA, 8-bit and
# LoftQ through bitsandbytes, SIGKILL + exact resume on the GPU, FSDP2 and DeepSpeed ZeRO-3 over every
# GPU (lorafit train --launcher accelerate), lorafit serve on the GPU (and --engine vllm where vLLM is
# installed), and bench/train_throughput.py
# against Trainer + PEFT bf16; one "CHECK name ..." line of figures each (bench/gpu_check.py).
#
# What it installs: with network, the CUDA build of the pinned torch==2.13.0 (PyPI's default
# build for Linux) and bitsandbytes into a venv of its own, then lorafit with its pins. Without
# network (the device machines here) it uses the image's CUDA torch and the wheels carried in
# .whl/ (made beforehand by bench/gpu_wheels.sh), lorafit itself from src/. The CPU-only install
# (scripts/setup.sh) never runs this and never pulls a CUDA package.
#
#     bash bench/gpu_check.sh            # figures also in $OUT/gpu_check.txt (default /tmp/gpu-check)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
PY=python3
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  if ls .whl/deepspeed-*.tar.gz >/dev/null 2>&1; then  # source only; DS_BUILD_OPS=0: kernels built on first use
    DS_BUILD_OPS=0 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/deepspeed-*.tar.gz ||
      echo "gpu_check: deepspeed did not install; the ZeRO-3 check will fail"
  fi
  export PYTHONPATH="/tmp/site:$PWD/src"
elif "$PY" -m pip download -q --no-deps -d /tmp/probe six >/dev/null 2>&1; then
  "$PY" -m venv /tmp/gpu-venv && PY=/tmp/gpu-venv/bin/python
  "$PY" -m pip install -q torch==2.13.0 && "$PY" -m pip install -q -c constraints.txt -e ".[deepspeed]" "bitsandbytes>=0.43" || exit 1
  export PYTHONPATH="$PWD/src"
else
  export PYTHONPATH="$PWD/src"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/nvidia-smi: /'
timeout 470 "$PY" bench/gpu_check.py --out "$OUT" "$@"
