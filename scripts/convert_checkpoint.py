"""Extract the weights of a checkpoint that holds Python objects besides tensors (a whole model
saved with `torch.save(model)`; the official code's training checkpoints, which store their
yacs config), so that it loads with `torch.load(..., weights_only=True)`, as main.py and timm
load checkpoints.

Reading the input unpickles arbitrary Python objects: run this only on files you trust.

    python scripts/convert_checkpoint.py ckpt_epoch_299.pth focal_tiny_weights.pth
"""
import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import unwrap_state_dict  # noqa: E402


def extract_weights(checkpoint) -> dict:
    """The tensors of the state dict inside a checkpoint: a dict holding the state dict (or
    the model) under 'model' or 'state_dict' or at its top level, or a model itself."""
    if isinstance(checkpoint, dict):
        checkpoint = {key: value.state_dict() if isinstance(value, nn.Module) else value
                      for key, value in checkpoint.items()}
    elif isinstance(checkpoint, nn.Module):
        checkpoint = checkpoint.state_dict()
    else:
        raise ValueError(f'it holds a {type(checkpoint).__name__}, neither a model nor a dict '
                         f'of weights')
    weights = {name: value for name, value in unwrap_state_dict(checkpoint).items()
               if isinstance(value, torch.Tensor)}
    if not weights:
        raise ValueError('no tensors found under model, state_dict or the top level')
    return weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('source', help='trusted checkpoint to read (fully unpickled)')
    parser.add_argument('target', help='weights-only checkpoint to write: {"model": state dict}')
    args = parser.parse_args()
    if os.path.abspath(args.source) == os.path.abspath(args.target):
        sys.exit('error: the target must differ from the source, which is kept as it is')
    try:
        weights = extract_weights(torch.load(args.source, map_location='cpu', weights_only=False))
    except (OSError, RuntimeError, ValueError) as error:
        sys.exit(f'error: cannot convert {args.source}: {error}')
    except (ImportError, AttributeError) as error:  # a pickled class this code does not have
        sys.exit(f'error: cannot convert {args.source}: it pickles a class that cannot be '
                 f'imported here ({type(error).__name__}: {error}); convert it where the code '
                 f'that saved it is importable')
    torch.save({'model': weights}, args.target)
    print(f'wrote {len(weights)} tensors to {args.target}')


if __name__ == '__main__':
    main()
