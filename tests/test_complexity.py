"""GFLOPs count attention from its shapes, whichever kernel runs it."""
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.complexity import attention_flops, count_gflops, register_attention_flops  # noqa: E402


class Attention(nn.Module):
    """Focal-T's first-stage attention shapes, 49 queries on 232 keys, with an additive float
    bias (the case torch 2.14's CPU flash kernel counted as 0), run by `attend(q, k, v, bias)`."""

    def __init__(self, attend):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # count_gflops reads the device from it
        self.attend = attend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, kv = torch.randn(1, 3, 49, 32), torch.randn(1, 3, 232, 32)
        return self.attend(q, kv, kv, torch.randn(1, 3, 49, 232))


EXPECTED_GFLOPS = 2 * 3 * 49 * 232 * 32 / 1e9  # two matmuls of 3 x 49 x 232 x 32 multiply-adds


def sdpa(q, k, v, bias):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def test_sdpa_counts_its_matmuls_on_every_kernel():
    assert abs(count_gflops(Attention(sdpa), 1) - EXPECTED_GFLOPS) < 1e-12
    with sdpa_kernel(SDPBackend.MATH):  # the matmuls the flop counter counts itself
        assert abs(count_gflops(Attention(sdpa), 1) - EXPECTED_GFLOPS) < 1e-12


@torch.library.custom_op('complexity_test::attention', mutates_args=())
def custom_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def test_a_registered_custom_attention_op_counts_from_its_shapes():
    model = Attention(custom_attention)
    assert count_gflops(model, 1) == 0  # an unregistered op is opaque to the flop counter
    register_attention_flops(torch.ops.complexity_test.attention.default)
    assert abs(count_gflops(model, 1) - EXPECTED_GFLOPS) < 1e-12


def test_attention_flops_count_query_heads_against_shared_keys():
    assert attention_flops((2, 8, 10, 16), (2, 2, 30, 16), (2, 2, 30, 4)) == 2 * 2 * 8 * 10 * 30 * (16 + 4)
