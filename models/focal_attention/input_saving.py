"""A CPU stand-in for `scaled_dot_product_attention` that keeps for backward what the fused CUDA
kernels keep: its query, key, value and bias inputs (PyTorch's CPU math path saves other tensors,
the attention matrix among them). With it a CPU shows what a GPU training step holds for backward:
`scripts/activation_memory.py` measures it, and `tests/test_regather.py` checks that the gathered
focal keys stay out of it (see `regather`)."""
import torch


class InputSavingAttention(torch.autograd.Function):
    """Softmax attention with an additive bias that saves its query, key, value and bias inputs
    for backward, as the fused CUDA kernels do, and recomputes the rest there."""

    @staticmethod
    def forward(ctx, query, key, value, bias, scale):
        ctx.save_for_backward(query, key, value, bias)
        ctx.scale = scale
        return InputSavingAttention.attend(query, key, value, bias, scale)

    @staticmethod
    def backward(ctx, grad):
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        with torch.enable_grad():
            out = InputSavingAttention.attend(*inputs, ctx.scale)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad))
        return (*(next(grads) if t.requires_grad else None for t in inputs), None)

    @staticmethod
    def attend(query, key, value, bias, scale):
        scores = query @ key.transpose(-1, -2) * scale
        return torch.softmax(scores if bias is None else scores + bias, -1) @ value


def input_saving_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """`F.scaled_dot_product_attention`'s signature, for an additive float mask without dropout."""
    if dropout_p or is_causal or (attn_mask is not None and not attn_mask.is_floating_point()):
        raise ValueError('the stand-in attention takes an additive float mask, no dropout or causal mask')
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    device = query.device.type
    if torch.is_autocast_enabled(device):  # autocast casts SDPA's inputs to its dtype
        dtype = torch.get_autocast_dtype(device)
        query, key, value = (t.to(dtype) for t in (query, key, value))
        attn_mask = None if attn_mask is None else attn_mask.to(dtype)
    return InputSavingAttention.apply(query, key, value, attn_mask, scale)
