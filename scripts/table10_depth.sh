#!/usr/bin/env bash
# Table 10: stage depths 2-2-2-2, 2-2-4-2 and 2-2-6-2 for Swin-T and Focal-T.
# Rows shared with Table 2 reuse its run folders. Environment: see common.sh; extra args go to main.py.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
for config in \
    configs/ablations/swin_tiny_depth2222.yaml \
    configs/ablations/swin_tiny_depth2242.yaml \
    configs/baselines/swin_tiny.yaml \
    configs/ablations/focal_tiny_depth2222.yaml \
    configs/ablations/focal_tiny_depth2242.yaml \
    configs/focal_tiny.yaml \
; do
    train_and_eval "$config" "$@"
done
