#!/usr/bin/env bash
# The test suite: lint, then every test (the slow ones on the real model included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Multi-process tests run DeepSpeed ZeRO-2 on its CPU accelerator: the pinned deepspeed (pure
# Python at install; the torch already installed is kept, no CUDA packages come with it).
if ! .venv/bin/python -c "import deepspeed" >/dev/null 2>&1; then
  echo "setup: installing deepspeed for the multi-process tests ..."
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[deepspeed]"
fi
# train.report_to is tested against the trackers themselves (TensorBoard's event reader, MLflow's
# client on a SQLite store, W&B's offline run files): their extras, pinned like everything else.
if ! .venv/bin/python -c "import tensorboard, wandb, mlflow, sqlalchemy, trackio" >/dev/null 2>&1; then
  echo "setup: installing the tracker extras (tensorboard, wandb, mlflow, trackio) for the tracking tests ..."
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[tensorboard,wandb,mlflow,trackio]"
fi
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
# GGUF exports are checked in a real llama.cpp runtime (llama-cpp-python). PyPI has it only as
# source, which builds in about 10 minutes here: built once into a wheel cache, installed from it.
# The build is portable x86-64 with AVX2/AVX-512 rather than -march=native: on a Xeon with AMX,
# where the sandbox does not grant the AMX tile state, a native build's AMX kernels crash every
# decode (general protection fault in libggml-cpu). The build's name keys the cache and the venv
# (--no-cache-dir: pip's own wheel cache ignores CMAKE_ARGS and would hand back a native build).
LLAMA_CPP=llama-cpp-python==0.3.36
LLAMA_CPP_BUILD=portable-avx512-1
LLAMA_CPP_CMAKE="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON"
WHEELS="${XDG_CACHE_HOME:-$HOME/.cache}/lorafit/wheels/$LLAMA_CPP_BUILD"
if [ "$(cat .venv/.llama-cpp-build 2>/dev/null)" != "$LLAMA_CPP_BUILD" ]; then
  if ! ls "$WHEELS"/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
    echo "setup: building $LLAMA_CPP ($LLAMA_CPP_BUILD) once into $WHEELS (about 10 minutes) ..."
    mkdir -p "$WHEELS"
    if ! CMAKE_ARGS="$LLAMA_CPP_CMAKE" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" .venv/bin/python -m pip wheel --quiet --no-cache-dir \
        --no-deps --disable-pip-version-check "$LLAMA_CPP" -w "$WHEELS"; then
      if [ -n "${CI:-}" ]; then
        echo "setup: could not build $LLAMA_CPP; CI needs it for the GGUF export checks" >&2
        exit 1
      fi
      echo "setup: could not build $LLAMA_CPP; the llama.cpp export checks will be skipped"
    fi
  fi
  if ls "$WHEELS"/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall \
      "$WHEELS"/llama_cpp_python-0.3.36-*.whl
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt diskcache
    echo "$LLAMA_CPP_BUILD" > .venv/.llama-cpp-build
  fi
fi
# The model-family tests use llama.cpp's own files as outside references: the vocab-only GGUFs of
# Llama 2/3, Qwen and Phi-3 with llama.cpp's tokenizer test vectors, the instruct models' chat
# templates and the reference converter convert_hf_to_gguf.py. They come in llama-cpp-python's
# source distribution, fetched once into the cache (the parts needed, ~80 MB) and never copied here.
SOURCES="${XDG_CACHE_HOME:-$HOME/.cache}/lorafit/sources"
LLAMA_CPP_TREE="$SOURCES/llama_cpp_python-0.3.36/vendor/llama.cpp"
if [ ! -f "$LLAMA_CPP_TREE/convert_hf_to_gguf.py" ]; then
  echo "setup: fetching the $LLAMA_CPP source distribution into $SOURCES (model-family references) ..."
  mkdir -p "$SOURCES"
  if .venv/bin/python -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
      "$LLAMA_CPP" -d "$SOURCES" >/dev/null 2>&1; then
    tree=llama_cpp_python-0.3.36/vendor/llama.cpp
    tar -xzf "$SOURCES/llama_cpp_python-0.3.36.tar.gz" -C "$SOURCES" \
      "$tree/models" "$tree/convert_hf_to_gguf.py" "$tree/conversion" "$tree/gguf-py"
    rm -f "$SOURCES/llama_cpp_python-0.3.36.tar.gz"
  elif [ -n "${CI:-}" ]; then
    echo "setup: could not fetch $LLAMA_CPP's source; CI needs it for the model-family checks" >&2
    exit 1
  else
    echo "setup: could not fetch $LLAMA_CPP's source; the model-family tests will be skipped"
  fi
fi
.venv/bin/ruff check src tests bench
exec .venv/bin/python -m pytest "$@"
