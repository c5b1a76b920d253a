#!/usr/bin/env bash
# Table 9: window shift on and off for Swin-T and Focal-T (Focal-T itself has no shift).
# Rows shared with Table 2 reuse its run folders. Environment: see common.sh; extra args go to main.py.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
for config in \
    configs/baselines/swin_tiny.yaml \
    configs/ablations/swin_tiny_noshift.yaml \
    configs/ablations/focal_tiny_shift.yaml \
    configs/focal_tiny.yaml \
; do
    train_and_eval "$config" "$@"
done
