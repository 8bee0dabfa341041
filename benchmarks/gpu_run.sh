#!/usr/bin/env bash
# One prepared run on a lent GPU machine (issue 6's GPU table, issue 3's plan check), at most 8 minutes (each step has its own time limit).
#
#   bash benchmarks/gpu_run.sh OUT_DIR          # on the GPU machine, from the repository root
#
# The machine's python3 has torch but not pydantic: wheels in .whl/ (cp312, see docs/performance.md) are
# installed to /tmp/site first when present. Every step runs on its own and logs to OUT_DIR, so that one
# failure does not cost the others; the tables come last in the output.
#   1. etft bench: seed_original (64 observed inputs) and seed_v2_1 (32), fp32 and bf16, as configured
#      (micro-batch x accumulation) and as one micro-batch of the same effective batch (the same gradients)
#   2. benchmarks/gpu_check.py: measured peaks against `etft plan`, capped cards, a forced OOM
#   3. seed_original bf16 one micro-batch with train.compile=true (compile time included in the log)
set -u
out=${1:?usage: gpu_run.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 3; }
    export PYTHONPATH=/tmp/site:$PWD/src
else
    export PYTHONPATH=$PWD/src
fi
etft() { python3 -c "import sys; from enhanced_tft.cli import main; sys.exit(main())" "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"

step() {   # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, say how it ended
    local name=$1 limit=$2; shift 2
    local started=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - started)) s"
}
quick=(--repeats 3 --warmup 3 --seconds 1.5)
step bench_configured 90 etft bench --config configs/seed_original.yaml --num_features 64 --precision fp32 bf16 \
    "${quick[@]}" --json "$out/bench_original.json"
step bench_v2_1 75 etft bench --config configs/seed_v2_1.yaml --num_features 32 --precision fp32 bf16 \
    "${quick[@]}" --json "$out/bench_v2_1.json"
step bench_one_micro 90 etft bench --config configs/seed_original.yaml --num_features 64 --precision fp32 bf16 \
    --set train.micro_batch_size=128 --set train.gradient_accumulation_steps=1 "${quick[@]}" --json "$out/bench_original_128x1.json"
step bench_v2_1_one_micro 75 etft bench --config configs/seed_v2_1.yaml --num_features 32 --precision fp32 bf16 \
    --set train.micro_batch_size=32 --set train.gradient_accumulation_steps=1 "${quick[@]}" --json "$out/bench_v2_1_32x1.json"
step gpu_check 120 python3 benchmarks/gpu_check.py --out "$out/gpu_check.json"
step bench_compiled 110 etft bench --config configs/seed_original.yaml --num_features 64 --precision bf16 \
    --set train.micro_batch_size=128 --set train.gradient_accumulation_steps=1 --set train.compile=true "${quick[@]}" \
    --json "$out/bench_original_compiled.json"

for name in bench_configured bench_v2_1 bench_one_micro bench_v2_1_one_micro gpu_check bench_compiled; do
    echo "---- $name"
    grep -E "config |^seed|^case|^device|samples/s|train.compile|rror|Traceback" "$out/$name.log" | grep -v "^ *File" | tail -14
done
