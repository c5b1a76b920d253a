"""`build_optimizer(config, model, lr)`: AdamW (or SGD) with weight decay only where it belongs."""
from typing import Iterable, List, Set

import torch
from torch import nn
from yacs.config import CfgNode as CN


def parameter_groups(model: nn.Module, weight_decay: float, skip_names: Set[str],
                     skip_keywords: Iterable[str]) -> List[dict]:
    """Two groups: decayed weights, and parameters exempt from weight decay.

    Exempt are 1-D tensors (norm scales, biases, layer-scale gammas), names ending in `.bias`,
    names in `skip_names` (the model's `no_weight_decay()`, e.g. `absolute_pos_embed`) and names
    containing a `skip_keywords` entry (`no_weight_decay_keywords()`, e.g. the relative
    position bias tables).
    """
    skip_keywords = tuple(skip_keywords)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = (param.ndim <= 1 or name.endswith('.bias') or name in skip_names
                  or any(keyword in name for keyword in skip_keywords))
        (no_decay if exempt else decay).append(param)
    return [{'params': decay, 'weight_decay': weight_decay},
            {'params': no_decay, 'weight_decay': 0.0}]


def build_optimizer(config: CN, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The optimizer for `model` (unwrapped from DDP) at `lr`: `TRAIN.BASE_LR` scaled to the
    total batch (`lr_scheduler.LearningRates.base`)."""
    skip_names = set(model.no_weight_decay()) if hasattr(model, 'no_weight_decay') else set()
    skip_keywords = set(model.no_weight_decay_keywords()) \
        if hasattr(model, 'no_weight_decay_keywords') else set()
    groups = parameter_groups(model, config.TRAIN.WEIGHT_DECAY, skip_names, skip_keywords)
    opt = config.TRAIN.OPTIMIZER
    if opt.NAME == 'sgd':
        return torch.optim.SGD(groups, lr=lr, momentum=opt.MOMENTUM,
                               nesterov=True)
    return torch.optim.AdamW(groups, lr=lr, eps=opt.EPS,
                             betas=tuple(opt.BETAS))
