#!/usr/bin/env bash
# Issue 12's GPU checks in ONE run on a lent GPU machine (docs/benchmarks.md, "GPU checks"): a ~1B stand-in
# (random Llama, no hub there) trained with LoRA in bf16, under ZeRO-3 and as QLoRA (peak memory, tokens/s),
# the CUDA-only tests, ensemble scoring and PPO memory on the GPU. Every step is timed and a failing step
# is recorded, not fatal. Results: $OUT/gpu-checks.json, one log per step.
#   here:        bash scripts/gpu-wheels.sh          (the packages that machine lacks, into .whl/)
#   GPU machine: bash scripts/gpu-checks.sh          (device tool: carry [".whl"], timeout_s 600)
#   here, smoke: GPU_CHECKS_SMOKE=1 bash scripts/gpu-checks.sh   (CPU, tiny sizes: checks the plumbing)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
: > "$OUT/steps.tsv"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
WORK=${GPU_CHECKS_WORK:-/tmp/alignkit-gpu-checks}
rm -rf "$WORK" && mkdir -p "$WORK"

step() {  # step NAME CMD...: run, log to $OUT/NAME.log, record rc and seconds
  local name=$1 start rc
  shift
  echo "=== $name: $*"
  start=$(date +%s%N)
  timeout "${STEP_TIMEOUT:-240}" "$@" >"$OUT/$name.log" 2>&1  # a hung step: rc 124, the next one runs
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( ($(date +%s%N) - start) / 1000000 ))" | tee -a "$OUT/steps.tsv"
  tail -n 4 "$OUT/$name.log"
}

if [ -d .whl ] && [ "${GPU_CHECKS_SMOKE:-0}" != 1 ]; then  # the lent machine: its torch stays, the carried wheels go first on the path
  SITE=$WORK/site
  PIP="$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE"
  # three steps, so that one failing (say the deepspeed build) leaves the others' checks meaningful
  step install-wheels $PIP .whl/*.whl
  # deepspeed is an sdist: built there against the machine's torch (setuptools and wheel are on that machine)
  step install-deepspeed env DS_BUILD_OPS=0 $PIP --no-build-isolation .whl/deepspeed-*.tar.gz
  step install-bitsandbytes cp -r .whl/site/. "$SITE/"
  export PYTHONPATH=$SITE:$PWD
else
  export PYTHONPATH=$PWD
fi
AK="$PY -m alignkit"

if [ "${GPU_CHECKS_SMOKE:-0}" = 1 ]; then  # CPU: the same steps at toy sizes
  HIDDEN=64 LAYERS=2 HEADS=2 INTER=128 STEPS=2 BATCH=2 MAXLEN=64 ROWS=16 DTYPE=float32 DEVICE=cpu
  SCORE_ROWS=32 SCORE_BACKBONE=tiny PPO_ARGS="--hidden 64 --layers 2 --iterations 1"
else
  HIDDEN=2048 LAYERS=16 HEADS=16 INTER=5504 STEPS=40 BATCH=8 MAXLEN=512 ROWS=2048 DTYPE=bfloat16 DEVICE=cuda
  SCORE_ROWS=512 SCORE_BACKBONE=random-llama PPO_ARGS="--iterations 3"
fi

step env bash -c "nvidia-smi || true; $PY -c 'import sys, torch, transformers, trl, peft, accelerate, datasets
print(sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.cuda.is_available(),
      \"transformers\", transformers.__version__, \"trl\", trl.__version__, \"peft\", peft.__version__,
      \"accelerate\", accelerate.__version__, \"datasets\", datasets.__version__)
import importlib.util
print(\"missing modules:\", [m for m in (\"click\", \"rich\", \"shellingham\", \"pytest\", \"xxhash\", \"pyarrow\", \"fsspec\",
      \"msgpack\", \"psutil\", \"tqdm\", \"yaml\", \"matplotlib\", \"pydantic\", \"typer\") if importlib.util.find_spec(m) is None])
for name in (\"deepspeed\", \"bitsandbytes\", \"vllm\"):
    try:
        print(name, __import__(name).__version__)
    except Exception as err:
        print(name, \"missing:\", type(err).__name__, str(err)[:200])'"

# the CUDA-only tests (they skip without a GPU; vLLM's skip without vllm, which no lent machine can carry)
step cuda-tests $PY -m pytest -q -m "" -p no:cacheprovider -rs \
  "tests/test_qlora.py::test_4bit_tiny_has_linear4bit_layers_and_trains_only_lora" \
  "tests/test_vllm_backend.py::test_real_vllm_greedy_texts_equal_hf"

step standin $PY -c "from pathlib import Path; from alignkit.bench.common import random_llama
random_llama(Path('$WORK/standin'), hidden=$HIDDEN, layers=$LAYERS, heads=$HEADS, intermediate=$INTER)"

SFT="$AK sft --model $WORK/standin --data builtin:sft --max-samples $ROWS --max-steps $STEPS --batch-size $BATCH
  --max-length $MAXLEN --lora --lora-r 16 --dtype $DTYPE --device $DEVICE --set model.lora.target_modules=all-linear
  --set train.gradient_checkpointing=true --set train.logging_steps=1 --set train.save_steps=0"
step sft-lora-bf16 $SFT -o "$WORK/runs/sft-lora"
step sft-lora-zero3 $SFT --num-processes 1 --accelerate-config zero3 -o "$WORK/runs/sft-zero3"
step sft-qlora $SFT --load-in-4bit -o "$WORK/runs/sft-qlora"

step rm-scoring $AK bench rm-scoring --backbone "$SCORE_BACKBONE" --device "$DEVICE" --rows "$SCORE_ROWS" \
  --repeats 3 --json "$OUT/rm-scoring.json"
step ppo-memory $AK bench ppo-memory $PPO_ARGS --device "$DEVICE" --dtype "$DTYPE" --json "$OUT/ppo-memory.json"

$PY - "$OUT" "$WORK" <<'EOF'
import json, sys
from pathlib import Path

out, work = Path(sys.argv[1]), Path(sys.argv[2])
steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
result = {"steps": {name: {"rc": int(rc), "seconds": int(ms) / 1000} for name, rc, ms in steps}, "sft": {}}
keys = ("steps", "train_runtime_s", "train_tokens", "train_tokens_per_s", "train_samples_per_s",
        "peak_gpu_memory_gib", "trainable_params", "total_params", "first_loss", "last_loss")
for run in ("sft-lora", "sft-zero3", "sft-qlora"):
    summary = work / "runs" / run / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        result["sft"][run] = {k: s.get(k) for k in keys}
for name in ("rm-scoring", "ppo-memory"):
    f = out / f"{name}.json"
    if f.is_file():
        result[name] = json.loads(f.read_text())
(out / "gpu-checks.json").write_text(json.dumps(result, indent=1))
print(json.dumps({"steps": result["steps"], "sft": result["sft"]}, indent=1))
EOF
