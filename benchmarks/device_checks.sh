#!/usr/bin/env bash
# Every open issue's GPU part in one prepared run, for a session that is lent a device machine (15 minutes in
# all, a start included): run it at once, with a timeout that leaves room for one rerun, then give the machine back.
#
#   device run (from a clean checkout here, timeout_s 560), the commit written into the command, since the tree
#   copied there has no git history (a $(git ...) in the command would run there):
#     SEGGPT_COMMIT=<git rev-parse --short HEAD, run here> bash benchmarks/device_checks.sh
#
# What it measures, each as JSON with the commit and the GPU under $OUT (benchmarks/results/device here):
# - issue 28 item 5: bench_core.py at its default settings: pairs/s at 32 x 8, the ratio against transformers'
#   fp32 pipeline at 8 x 1, the default path against quality=None at 8 x 1 and 32 x 8, peak memory at 32 x 8;
#   the bars and whether they hold are in the JSON's "issue_28_item_5";
# - issue 31 item 4: in-context tuning of the full ViT-L config (random weights) in bf16: seconds per step and
#   peak memory at batch 1 and 2.
# Not here: the Ray engine with one actor per GPU (issue 28 item 5), since ray is not installed there and its
# wheel is larger than what a call carries (64 MiB).
# Budget: machine start and copy 1-2 min, bench_core about 6 min, tuning about 1 min.
# DRY=1 checks the script on a CPU (a small config for bench_core, one tuning step): its figures mean nothing.
set -uo pipefail
OUT=${OUT:-benchmarks/results/device}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1  # and SEGGPT_COMMIT, from the caller
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.csv" 2>&1 \
    || [ "${DRY:-0}" = 1 ] || status=1
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.is_available())" \
    | tee "$OUT/versions.txt" || status=1
if [ "${DRY:-0}" = 1 ]; then
    device=cpu core=(--small --gpu-sweep --budget 60) tune=(--steps 1 --batch-sizes 1)
else
    device=cuda core=(--budget 330) tune=(--steps 5)
fi
timeout 420 python3 benchmarks/bench_core.py --device $device "${core[@]}" --out "$OUT/bench_core_$device.json" \
    2>&1 | tee "$OUT/bench_core_$device.log" || status=1
timeout 300 python3 benchmarks/bench_tune_vitl.py --device $device --dtype bfloat16 "${tune[@]}" \
    --out "$OUT/bench_tune_vitl_$device.json" 2>&1 | tail -20 || status=1
exit $status
