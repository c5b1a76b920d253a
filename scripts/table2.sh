#!/usr/bin/env bash
# Table 2: every row this repository can train (Focal-T/S/B and the timm baselines), in turn.
# Environment: NPROC, BATCH, DATA, OUTPUT, TAG, DRY_RUN (see common.sh).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_scripts table2_focal_tiny.sh table2_focal_small.sh table2_focal_base.sh \
    table2_swin_tiny.sh table2_swin_small.sh table2_swin_base.sh \
    table2_resnet50.sh table2_resnet101.sh table2_resnet152.sh \
    table2_deit_small.sh table2_deit_base.sh table2_vit_base_384.sh
