#!/usr/bin/env bash
# Every GPU check and timing of the fused focal attention, in parts that each fit a 10-minute call
# on one H100 (logs under $OUT, default gpu_checks/):
#   scripts/gpu_checks.sh correctness   # tests/test_fused_cuda.py + the attention-op table (~3 min)
#   scripts/gpu_checks.sh eager         # Focal-T vs Swin-T, inference and training, fused and sdpa (~4 min)
#   scripts/gpu_checks.sh compiled      # the same with torch.compile, fused only (~6 min)
#   scripts/gpu_checks.sh swin-sdpa     # training against Swin-T with SDPA (TIMM_FUSED_ATTN=2) (~2 min)
#   scripts/gpu_checks.sh sizes         # Focal-S/B vs Swin-S/B, eager, fused (~5 min)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_checks}
mkdir -p "$out"
bench() { python scripts/benchmark.py --device cuda --batch-size 128 "$@"; }
case "${1:-correctness}" in
  correctness)
    python -m pytest -q tests/test_fused_cuda.py 2>&1 | tee "$out/test_fused_cuda.txt"
    python scripts/benchmark_attention.py --device cuda 2>&1 | tee "$out/attention_op_tiny_bf16.txt"
    python scripts/benchmark_attention.py --device cuda --dtype fp32 --batch-size 32 2>&1 | tee "$out/attention_op_tiny_fp32.txt" ;;
  eager) bench --sizes tiny --attn-backend fused sdpa 2>&1 | tee "$out/eager_tiny.txt" ;;
  compiled) bench --sizes tiny --attn-backend fused --compile 2>&1 | tee "$out/compiled_tiny.txt" ;;
  swin-sdpa) TIMM_FUSED_ATTN=2 bench --sizes tiny --mode train --attn-backend fused 2>&1 | tee "$out/swin_sdpa_tiny.txt" ;;
  sizes) bench --sizes small base --attn-backend fused 2>&1 | tee "$out/eager_small_base.txt" ;;
  *) echo "usage: $0 [correctness|eager|compiled|swin-sdpa|sizes]" >&2; exit 2 ;;
esac
