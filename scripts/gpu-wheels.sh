#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels a lent GPU machine lacks (it has torch, accelerate, peft and
# most of the scientific stack, but not trl, datasets or alignkit's pins, and it reaches no index) into
# .whl/ (git-ignored), for scripts/gpu-checks.sh. Versions are constraints.txt's; Python 3.12, x86-64.
# One call carries at most 64 MiB (the repository included): tokenizers, hf-xet and accelerate are taken
# from the machine's own (they satisfy the pins' floors), and bitsandbytes is unpacked into .whl/site/ with
# only its CUDA 13 libraries (the machine's torch is a cu13x build; the wheel's CUDA 11/12 copies are 100 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
pin() { grep -i "^$1==" constraints.txt | head -1; }
dl() {
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux1_x86_64 -d .whl "$@"
}
rm -rf .whl && mkdir -p .whl
dl $(for p in transformers trl datasets dill multiprocess pydantic pydantic_core annotated-types \
              typing-inspection huggingface_hub peft typer vaderSentiment; do pin $p; done) \
   hjson "bitsandbytes==0.50.2"
mkdir -p .whl/site && python3 -m zipfile -e .whl/bitsandbytes-*.whl .whl/site && rm .whl/bitsandbytes-*.whl
rm -f .whl/site/bitsandbytes/libbitsandbytes_cuda1[12]*.so
# deepspeed ships only an sdist; its ops are JIT-built, so the plain-Python install is what ZeRO needs
python3 -m pip download --quiet --no-deps --no-binary=:all: -d .whl "deepspeed==0.19.8"
du -sh --apparent-size .whl && ls .whl
