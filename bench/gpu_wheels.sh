#!/usr/bin/env bash
# Wheels for bench/gpu_check.sh on a device machine without network: lorafit's dependencies that
# its image lacks (it has torch, transformers, peft, accelerate), for CPython 3.12 on x86-64,
# into .whl/ (ignored by git; the device tool carries it: 64 MiB at most).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
fetch() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$@"
}
for name in trafilatura courlan htmldate justext lxml_html_clean dateparser tld babel tzlocal datasketch \
    gguf pypdf rouge-score nltk sacrebleu bitsandbytes hjson fastapi starlette uvicorn h11 annotated-doc \
    opentelemetry-api; do
  version=$(grep -i "^${name//_/[-_]}==" constraints.txt | head -1 | cut -d= -f3)
  fetch "$name${version:+==$version}" || echo "gpu_wheels: no wheel for $name"
done
# DeepSpeed (the ZeRO-3 check) is a source distribution only: built on the device machine, against its torch.
version=$(grep -i "^deepspeed==" constraints.txt | head -1 | cut -d= -f3)
python3 -m pip download -q --no-deps --no-binary :all: -d .whl "deepspeed==$version" || echo "gpu_wheels: no deepspeed source"
du -sh .whl
