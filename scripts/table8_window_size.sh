#!/usr/bin/env bash
# Table 8: window size 7 vs 14 for Swin-T and Focal-T.
# Rows shared with Table 2 reuse its run folders. Environment: see common.sh; extra args go to main.py.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
for config in \
    configs/baselines/swin_tiny.yaml \
    configs/ablations/swin_tiny_window14.yaml \
    configs/focal_tiny.yaml \
    configs/ablations/focal_tiny_window14.yaml \
; do
    train_and_eval "$config" "$@"
done
