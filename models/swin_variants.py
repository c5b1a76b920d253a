"""Swin Transformer variants that timm's constructor kwargs cannot express.

Table 9 of the Focal paper trains Swin-T without its cyclic window shift. timm builds every
odd block with a shift of half a window and has no flag to turn that off, so this module
registers `swin_tiny_patch4_window7_224_noshift`: timm's Swin-T (any `depths`, `window_size`,
... kwargs pass through) with the shift disabled in every block. The shift has no parameters,
so the variant has exactly the parameters of the shifted model.
"""
from timm.models import create_model, register_model
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock


def disable_window_shift(model: SwinTransformer) -> SwinTransformer:
    """Make every block of `model` attend within the regular (unshifted) window grid; in place."""
    for block in model.modules():
        if isinstance(block, SwinTransformerBlock):
            block.target_shift_size = (0, 0)
            block.set_input_size(block.input_resolution, block.window_size)
    return model


@register_model
def swin_tiny_patch4_window7_224_noshift(pretrained=False, **kwargs) -> SwinTransformer:
    """Swin-T @ 224 with window shift off in every block (Focal paper Table 9, "w/o shift")."""
    if pretrained:
        raise ValueError('swin_tiny_patch4_window7_224_noshift has no released weights')
    return disable_window_shift(create_model('swin_tiny_patch4_window7_224', **kwargs))
