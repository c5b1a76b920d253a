"""Model size and cost as the papers report them: parameters in millions and GFLOPs counted as
multiply-adds, measured on the executed graph (so every op the model really runs is counted)."""
from typing import Tuple, Union

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def count_params_m(model: nn.Module) -> float:
    """Learnable parameters, in millions."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6


@torch.no_grad()
def count_gflops(model: nn.Module, input_size: Union[int, Tuple[int, int]] = 224, in_chans: int = 3) -> float:
    """Multiply-adds of one eval-mode forward pass at batch 1, in billions. `FlopCounterMode`
    counts a multiply-add as two FLOPs, hence the halving."""
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, in_chans, height, width, device=device))
    model.train(was_training)
    return counter.get_total_flops() / 2e9
