"""One description of a window's key order: the position bias each attention module adds follows the
keys its layout gathers, on every geometry of the models and tests, and a block's arguments are
normalised into its geometry in one place."""
import pytest
import torch

from models import FocalTransformer
from models.focal_attention import FocalGeometry, stage_block_shift_and_expand, window_layout
from models.focal_transformer import FocalWindowAttention

CPU = torch.device('cpu')
TINY = dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], focal_pool='fc', focal_levels=[2] * 4,
            focal_windows=[7, 5, 3, 1], expand_sizes=[3] * 4)
MODELS = {
    'Focal-T': TINY,
    'Focal-T, window 14 (stages 2-3 shrink their window)': dict(TINY, window_size=14),
    'levels 3, shifted, odd expand sizes, expand_layer odd': dict(
        img_size=64, window_size=4, embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1] * 4, focal_pool='fc',
        focal_levels=[3, 3, 3, 3], focal_windows=[3, 3, 1, 1], expand_sizes=[1, 3, 2, 1], use_shift=True,
        expand_layer='odd'),
    'window 5, levels 3 (sub-windows leave rows over)': dict(
        img_size=80, window_size=5, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1] * 4, focal_pool='mean',
        focal_levels=[3, 3, 2, 2], focal_windows=[5, 3, 1, 1], expand_sizes=[2, 2, 1, 0]),
    'focal level 1, no pooling': dict(img_size=64, window_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                                      num_heads=[1] * 4, focal_pool='none', focal_levels=[1] * 4,
                                      focal_windows=[1] * 4, expand_sizes=[2, 1, 0, 0]),
}
# The geometries tests/test_focal_attention.py runs both backends on.
ATTENTION_TEST_GEOMETRIES = [FocalGeometry(4, 1, 3, 0, 0), FocalGeometry(4, 1, 3, 1, 2), FocalGeometry(4, 2, 3, 2, 0),
                             FocalGeometry(4, 0, 1, 1, 1), FocalGeometry(5, 0, 1, 1, 0), FocalGeometry(7, 3, 7, 1, 0)]


def model_geometries(arguments: dict) -> list:
    with torch.device('meta'):
        model = FocalTransformer(**arguments)
    return [module.geometry for module in model.modules() if isinstance(module, FocalWindowAttention)]


GEOMETRIES = sorted({geometry for arguments in MODELS.values() for geometry in model_geometries(arguments)}
                    | set(ATTENTION_TEST_GEOMETRIES), key=repr)


def test_the_geometries_cover_what_the_tests_promise():
    assert {g.num_pooled_levels for g in GEOMETRIES} == {0, 1, 2}  # focal levels 1-3
    assert any(g.shift_size for g in GEOMETRIES) and {0, 1, 3} <= {g.expand_size for g in GEOMETRIES}
    assert {14, 7, 5, 4, 2} <= {g.window_size for g in GEOMETRIES}  # 14; 7 and 2 also by shrinking
    assert FocalGeometry(14, 0, 3, 1, 0) in GEOMETRIES  # a map of the window's size: no surroundings


def official_position_terms(attn: FocalWindowAttention, layout, window: int) -> dict:
    """{slot: (nH, ws^2) position terms} of the keys of `window`, as the official tables define them
    for the token the layout gathers into each slot (the zero key has no place, so no slot)."""
    geometry, ws = attn.geometry, attn.geometry.window_size
    (height, width), windows_across = layout.padded_size, layout.padded_size[1] // ws
    rows, cols = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing='ij')
    query_rows, query_cols = rows.flatten(), cols.flatten()
    top, left = window // windows_across * ws, window % windows_across * ws
    terms, ring = {}, 0
    for slot, source in enumerate(layout.key_index[window, :layout.num_attended].tolist()):
        if source < layout.num_fine:  # a fine token, at this offset from the window's top-left token
            margin = geometry.expand_size
            dy = (source // width - top + margin) % height - margin
            dx = (source % width - left + margin) % width - margin
            if 0 <= dy < ws and 0 <= dx < ws:  # the window's own token: Swin's relative position table
                entry = (query_rows - dy + ws - 1) * (2 * ws - 1) + query_cols - dx + ws - 1
                terms[slot] = attn.relative_position_bias_table[entry].t()
            else:  # the ring-th surrounding key: its own term per query
                terms[slot] = attn.relative_position_bias_table_to_neighbors[0, :, :, ring]
                ring += 1
            continue
        start = layout.num_fine
        for level in range(geometry.num_pooled_levels):
            stride = 2 ** level
            tokens = layout.num_windows * stride ** 2
            if start <= source < start + tokens:  # a pooled token, at this place in the neighbourhood
                side, grid_width = geometry.focal_window + stride - 1, windows_across * stride
                ky = (source - start) // grid_width - (top // ws * stride - geometry.focal_window // 2)
                kx = (source - start) % grid_width - (left // ws * stride - geometry.focal_window // 2)
                assert 0 <= ky < side and 0 <= kx < side, (slot, level)
                entry = (query_rows - ky + side - 1) * (ws + side - 1) + query_cols - kx + side - 1
                terms[slot] = attn.relative_position_bias_table_to_windows[level][:, entry]
            start += tokens
    return terms


@pytest.mark.parametrize('geometry', GEOMETRIES, ids=repr)
def test_position_bias_follows_the_layouts_key_order(geometry):
    """Every key slot of every window of a padded map gets the position terms of the token the
    layout gathers into it: Swin's relative position for its own tokens, the surrounding key's own
    term, the relative position in the pooled neighbourhood. The tables hold distinct values."""
    ws = geometry.window_size
    windows = max(3, geometry.focal_window // 2 + 2)  # enough that every pooled slot is in the map somewhere
    layout = window_layout(windows * ws - (ws > 1), (windows + 1) * ws, geometry, CPU)
    attn = FocalWindowAttention(8, geometry, num_heads=2).double()
    with torch.no_grad():
        tables = [p for name, p in attn.named_parameters() if 'relative_position' in name]
        offset = 0
        for table in tables:
            table.copy_(torch.arange(table.numel(), dtype=torch.float64).view(table.shape) + offset)
            offset += table.numel()
        bias = attn.position_bias()
        assert bias.shape == (2, layout.window_area, layout.num_keys)
        located = set()
        for window in range(layout.num_windows):
            for slot, expected in official_position_terms(attn, layout, window).items():
                assert torch.equal(bias[:, :, slot], expected), (window, slot)
                located.add(slot)
    assert located == set(range(layout.num_attended))


def test_a_block_normalises_its_arguments_once_into_its_geometry():
    small_map = FocalGeometry.of_block((7, 7), window_size=14, expand_size=3, shift_size=7, focal_window=5,
                                       focal_level=3, pool_method='fc')
    assert small_map == FocalGeometry(window_size=7, expand_size=0, focal_window=5, num_pooled_levels=2, shift_size=0)
    assert FocalGeometry.of_block((56, 56), 7, 3, 3, 7, 2, 'none').num_pooled_levels == 0
    assert FocalGeometry.of_block((56, 56), 7, 3, 0, 7, 0, 'fc') == FocalGeometry(7, 0, 7, 0, 0)
    with pytest.raises(ValueError, match='shift_size 7 must lie in'):
        FocalGeometry.of_block((56, 56), 7, 3, 7, 7, 2, 'fc')
    assert [stage_block_shift_and_expand(i, 7, 3, True, 'odd') for i in range(4)] == [(0, 3), (3, 0), (0, 3), (3, 0)]
    assert [stage_block_shift_and_expand(i, 7, 3, False, 'even') for i in range(2)] == [(0, 0), (0, 3)]
    assert [stage_block_shift_and_expand(i, 4, 1, False, 'all') for i in range(2)] == [(0, 1), (0, 1)]


def test_blocks_hold_the_geometry_their_attention_and_layouts_use():
    model = FocalTransformer(**MODELS['levels 3, shifted, odd expand sizes, expand_layer odd']).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    for stage in model.layers:
        for block in stage.blocks:
            assert block.geometry is block.attn.geometry and block.attn._layout.geometry == block.geometry
            assert len(block.pool_layers) == block.geometry.num_pooled_levels
            assert torch.equal(block.attn.position_bias_index, block.geometry.position_bias_index())
