#!/usr/bin/env bash
# Every GPU check the open scale work asks for, in one run (one H200: under 10 minutes, each check with its
# own time limit, so the whole fits one device call of 600 s), so that a
# session lent a GPU spends its device time on measuring, not on setting up:
#
#   OUT=/path/to/results bash benchmarks/gpu_checks.sh          # from the repository root
#
# No install: the package is imported from the checkout (PYTHONPATH). It needs torch with CUDA,
# lightning, transformers, torchmetrics, safetensors and numpy, which the device image has (checked in a
# venv with only those, no jsonargparse or datasets: everything runs, the CLI test skips). A failing check does
# not stop the others: each writes $OUT/<check>.log, and $OUT/summary.txt holds every check's exit code.
# What each check shows:
#   tests       the tests' CUDA variants: state in pinned host memory, fused kernels through Triton,
#               bf16 / 16-mixed precision, gradients consumed in the backward
#   scale_7b    Llama-2-7B shape, bf16, general + dual passes over 64 x 2048 tokens each (micro-batch 4):
#               ratios to a bare forward+backward (target <= 1.10), mask seconds (<= 2 s), peak GiB
#               against the estimate (<= 100 GB: G kept in bf16, general_dtype weights: estimated 92.6 GiB = 99.4 GB);
#               gradient checkpointing on both sides (without it the estimate is too close to the card's 139 GiB)
#   scale_7b_eager  the same dual pass with kernels: eager, to show what the fused kernels buy
#   fsdp_1gpu   FSDP2 (ModelParallelStrategy over a mesh of one GPU) against a plain fit: masks, G, S
#   speed_24    2:4 semi-structured kernels against dense on the demo model (benchmarks/speed.py)
set -u
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Overridable for a dry run of the script itself on a CPU:
#   DEVICE=cpu SHAPE=tiny SEQ=64 FSDP_SHAPE=tiny bash benchmarks/gpu_checks.sh
DEVICE=${DEVICE:-cuda} SHAPE=${SHAPE:-llama-2-7b} SEQ=${SEQ:-2048} FSDP_SHAPE=${FSDP_SHAPE:-llama-100m}
: > "$OUT/summary.txt"

run() {  # run NAME SECONDS COMMAND...: the command's output to $OUT/NAME.log, its exit code to summary.txt
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT/summary.txt"
    tail -n 12 "$OUT/$name.log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, lightning, transformers; print('torch', torch.__version__, 'lightning', lightning.__version__, 'transformers', transformers.__version__)"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

run tests 90 python3 -m pytest -q -p no:cacheprovider tests/test_fused_kernels.py tests/test_state_device.py tests/test_precision.py
run scale_7b 270 python3 benchmarks/scale.py --shape "$SHAPE" --device "$DEVICE" --dtype bfloat16 --tokens 64 \
    --seq-len "$SEQ" --batch-size 4 --checkpointing --repeats 1 --general-dtype weights
run scale_7b_eager 100 python3 benchmarks/scale.py --shape "$SHAPE" --device "$DEVICE" --dtype bfloat16 --tokens 16 \
    --seq-len "$SEQ" --batch-size 4 --checkpointing --repeats 1 --general-dtype weights --kernels eager
run fsdp_1gpu 60 python3 benchmarks/fsdp_check.py --accelerator "$DEVICE" --devices 1 --shape "$FSDP_SHAPE" --dtype bfloat16
run speed_24 70 python3 benchmarks/speed.py --device "$DEVICE" --dtype bfloat16 --prefill 512 "$SEQ" --repeats 10 \
    --output "$OUT/speed_gpu.md"
cat "$OUT/summary.txt"
