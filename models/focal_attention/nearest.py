"""Focal-fast's keys (the official `focal_transformer_v2.py`, "Faster Focal Transformer"). Instead of
its own tokens, a rolled ring of surroundings and unfolded pooled neighbourhoods, each window of
ws x ws queries attends to a fixed number of keys per level:

  * level 0: the K tokens of the whole map nearest to the window's centre,
  * each pooled level l >= 1: the K pooled windows nearest to the window (K capped at their number),

K = `top_k` (the official `focal_topK`), and every query-key pair gets a position term from a small
MLP per level of the query's coordinates relative to the key (`FocalFastAttention`). A fixed number
of gathered keys per window is what SDPA runs best.

Which keys a window sees is its *selection*: per level, a (nW, K) index of the keys and a (nW, K, 2)
offset, the window centre's coordinates minus the key's in tokens. A query's coordinates relative
to a key are that offset plus the query's own offset from the centre (`window_offsets`). The official
model keeps the per-query form, (nW, ws^2, K, 2), as buffers; this one keeps the per-window form.

`nearest_selection` selects as the official `get_topk_closest_indice` does (the same distances,
`torch.topk` on the CPU), so ties between equidistant keys fall the same way where the official code
runs, and extends it to every map: maps are padded to window multiples (the keys are the map's real
tokens), window centres are taken per axis (the official code assumes square maps). Beyond the
first pooled level (focal_level > 2; no released model) the official code selects among the windows
of the first pooled level and reads the level's own pooled map at those flat positions; so does
this one, so that such checkpoints compute what they computed.

A `NearestLayout` turns a selection into what `focal_attention` runs: the key index into [fine
tokens, pooled tokens, zero token] and, for the position terms, the distinct offsets of each level
and every key slot's index into them. Layouts of computed selections sit in the LRU cache of
`geometry`; a model's stored selection (from its checkpoint) makes the layout of its own map size.
"""
import functools
import math
import re
from dataclasses import dataclass
from typing import Dict, Tuple

import torch

from .geometry import KEY_ALIGNMENT, cached_layout, shift_gathers

Selection = Tuple[Tuple[torch.Tensor, torch.Tensor], ...]  # per level: (nW, K) long index, (nW, K, 2) float offset
TOPK_CHUNK = 1 << 24  # distances per torch.topk call in `nearest_keys` (64 MiB of float32)


@dataclass(frozen=True)
class NearestGeometry:
    """What decides a Focal-fast block's keys: its window, shift, pooled levels and K. Blocks of
    equal geometry share the layouts of computed selections."""
    window_size: int
    shift_size: int
    num_pooled_levels: int
    top_k: int

    def __post_init__(self):
        if not 0 <= self.shift_size < self.window_size:
            raise ValueError(f'shift_size {self.shift_size} must lie in [0, window_size {self.window_size})')
        if self.top_k < 1:
            raise ValueError(f'focal_topK must be a positive integer, got {self.top_k!r}')

    @classmethod
    def of_block(cls, input_resolution: Tuple[int, int], window_size: int, shift_size: int, focal_level: int,
                 pool_method: str, top_k: int) -> 'NearestGeometry':
        """The geometry of a block with the official block arguments: a map no larger than the window
        (at `input_resolution`, the size the model is built for) shrinks the window to the map,
        without shift; focal_level L has L - 1 pooled levels, none with pool_method 'none'."""
        if min(input_resolution) <= window_size:
            window_size, shift_size = min(input_resolution), 0
        return cls(window_size=window_size, shift_size=shift_size,
                   num_pooled_levels=focal_level - 1 if pool_method != 'none' and focal_level > 1 else 0,
                   top_k=top_k)

    @property
    def num_levels(self) -> int:
        return 1 + self.num_pooled_levels


def window_offsets(window_size: int) -> torch.Tensor:
    """(ws^2, 2) long: each query's (dy, dx) from its window's centre token (ws // 2, ws // 2),
    row-major (the official `window_coords`)."""
    centred = torch.arange(window_size, device='cpu') - window_size // 2
    dy, dx = torch.meshgrid(centred, centred, indexing='ij')
    return torch.stack([dy.flatten(), dx.flatten()], 1)


def _grid(rows: int, cols: int) -> torch.Tensor:
    """(rows * cols, 2) long (r, c) of a grid, row-major."""
    r, c = torch.meshgrid(torch.arange(rows, device='cpu'), torch.arange(cols, device='cpu'), indexing='ij')
    return torch.stack([r.flatten(), c.flatten()], 1)


def nearest_keys(centres: torch.Tensor, keys: torch.Tensor, candidate: torch.Tensor,
                 top_k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The min(top_k, candidates) candidate keys nearest to each centre, by Euclidean distance
    between (row, col) coordinates, as the official selection computes it (ties fall as
    `torch.topk` on the CPU breaks them). centres: (N, 2) long; keys: (T, 2) long; candidate: (T,)
    bool. Returns (N, K) long key positions and (N, K, 2) float offsets, centre minus key."""
    k = min(top_k, int(candidate.sum()))
    rows_per_call = max(1, TOPK_CHUNK // len(keys))
    index = []
    for chunk in centres.split(rows_per_call):
        relative = chunk[:, None, :] - keys[None, :, :]
        distance = torch.sqrt(relative[..., 0].float() ** 2 + relative[..., 1].float() ** 2)
        if not candidate.all():
            distance = distance.masked_fill(~candidate, math.inf)
        index.append(torch.topk(-distance, k, dim=1).indices)
    index = torch.cat(index)
    return index, (centres[:, None, :] - keys[index]).float()


@functools.lru_cache(maxsize=64)
def nearest_selection(geometry: NearestGeometry, height: int, width: int) -> Selection:
    """The selection (see the module docstring) of an (height, width) map, on the CPU: per level a
    (nW, K) long index and a (nW, K, 2) float offset. Level 0 indexes the padded (and shifted) map,
    row-major; pooled levels index the window grid, row-major. Callers must not modify the tensors
    (they are cached)."""
    ws, shift = geometry.window_size, geometry.shift_size
    padded_h, padded_w = math.ceil(height / ws) * ws, math.ceil(width / ws) * ws
    windows = _grid(padded_h // ws, padded_w // ws)
    tokens = _grid(padded_h, padded_w)
    # A token of the shifted padded map comes from ((r + shift) % Hp, (c + shift) % Wp) of the padded map.
    real = ((tokens[:, 0] + shift) % padded_h < height) & ((tokens[:, 1] + shift) % padded_w < width)
    selection = [nearest_keys(windows * ws + ws // 2, tokens, real, geometry.top_k)]
    if geometry.num_pooled_levels:
        index, offset = nearest_keys(windows, windows, torch.ones(len(windows), dtype=torch.bool, device='cpu'),
                                     geometry.top_k)
        selection += [(index, offset * ws)] * geometry.num_pooled_levels
    return tuple(selection)


def pooled_level_sizes(num_windows: int, num_pooled_levels: int) -> Tuple[int, ...]:
    """Tokens of each pooled level of a map of `num_windows` windows: 4^k sub-windows per window."""
    return tuple(num_windows * 4 ** level for level in range(num_pooled_levels))


class NearestLayout:
    """Everything a Focal-fast attention layer of one geometry needs about one (H, W) map, compact
    (nothing per query-key pair). The attributes `focal_attention`'s backends read are those of
    `geometry.WindowLayout`:

    key_index: (nW, S) int32 positions into the key/value source [Hp*Wp fine tokens, pooled tokens
        of each level, one zero token at `zero_token`]; slots past `num_attended` read the zero token.
    shift_gather / unshift_gather: as `WindowLayout`'s.

    and, for the position terms (the official model masks nothing; the alignment slots past
    `num_attended` get -inf through the terms, see `FocalFastAttention.position_bias`):

    bias_coords: (L, U, 2) float, the distinct query-minus-key coordinates of each level (zero-padded
        to the longest level): each level's MLP runs once on these.
    coord_index: (L * R + 1, ws^2) int32: the coordinate (level * U + entry) of query q and the r-th
        distinct key offset of level l, at row l * R + r; the last row reads L * U (the masked term).
    bias_index: (nW, S) int32: the row of `coord_index` of each key slot (alignment slots: the last).
    """
    position_bias_per_window = True  # the position terms differ between windows (see fused.unavailable_reason)

    def __init__(self, height: int, width: int, geometry: NearestGeometry, selection: Selection,
                 device: torch.device):
        ws = geometry.window_size
        padded_h, padded_w = math.ceil(height / ws) * ws, math.ceil(width / ws) * ws
        num_windows = (padded_h // ws) * (padded_w // ws)
        num_fine = padded_h * padded_w
        sources = (num_fine,) + (num_windows,) * geometry.num_pooled_levels  # what each level's index addresses
        level_sizes = (num_fine,) + pooled_level_sizes(num_windows, geometry.num_pooled_levels)
        level_bases = [sum(level_sizes[:level]) for level in range(geometry.num_levels)]
        zero_token = sum(level_sizes)
        if len(selection) != geometry.num_levels:
            raise ValueError(f'a selection of {len(selection)} levels for a geometry of {geometry.num_levels}')
        for level, (index, offset) in enumerate(selection):
            if index.dim() != 2 or index.shape[0] != num_windows or offset.shape != (*index.shape, 2):
                raise ValueError(f'level {level} selects keys for {tuple(index.shape)} (index) and '
                                 f'{tuple(offset.shape)} (offsets) windows x keys; a {height}x{width} map has '
                                 f'{num_windows} windows of {ws}x{ws}')
            if index.numel() and not 0 <= int(index.min()) <= int(index.max()) < sources[level]:
                raise ValueError(f'level {level} selects keys outside its {sources[level]} tokens')

        num_attended = sum(index.shape[1] for index, _ in selection)
        num_keys = math.ceil(num_attended / KEY_ALIGNMENT) * KEY_ALIGNMENT
        alignment = torch.full((num_windows, num_keys - num_attended), zero_token, dtype=torch.long)
        key_index = torch.cat([base + index.long() for base, (index, _) in zip(level_bases, selection)]
                              + [alignment], 1)

        # Key offsets (centre - key) of each level, distinct; then query-minus-key coordinates, distinct.
        offsets = [torch.unique(offset.reshape(-1, 2).float(), dim=0, return_inverse=True) for _, offset in selection]
        rows = max(len(values) for values, _ in offsets)
        queries = window_offsets(ws).float()
        coords = [torch.unique((queries[:, None] + values[None]).reshape(-1, 2), dim=0, return_inverse=True)
                  for values, _ in offsets]
        entries = max(len(values) for values, _ in coords)
        bias_coords = torch.zeros(geometry.num_levels, entries, 2)
        coord_index = torch.full((geometry.num_levels * rows + 1, ws * ws), geometry.num_levels * entries)
        for level, ((offset_values, _), (coord_values, inverse)) in enumerate(zip(offsets, coords)):
            bias_coords[level, :len(coord_values)] = coord_values
            first = level * rows
            coord_index[first:first + len(offset_values)] = level * entries + inverse.view(ws * ws, -1).t()
        bias_index = torch.cat([level * rows + inverse.view(num_windows, -1) for level, (_, inverse) in
                                enumerate(offsets)] + [torch.full_like(alignment, geometry.num_levels * rows)], 1)

        self.geometry = geometry
        self.size = (height, width)
        self.padded_size = (padded_h, padded_w)
        self.num_windows = num_windows
        self.window_area = ws * ws
        self.num_keys = num_keys
        self.num_attended = num_attended
        self.num_fine = num_fine
        self.zero_token = zero_token
        self.key_index = key_index.to(device=device, dtype=torch.int32)
        self.bias_coords = bias_coords.to(device)
        self.coord_index = coord_index.to(device=device, dtype=torch.int32)
        self.bias_index = bias_index.to(device=device, dtype=torch.int32)
        self.regions = None
        self.shift_gather, self.unshift_gather = shift_gathers(height, width, self.padded_size, geometry.shift_size,
                                                               device)
        self.backend_choices: Dict[tuple, str] = {}

    def nbytes(self) -> int:
        """Bytes held by the layout's tensors."""
        tensors = [self.key_index, self.bias_coords, self.coord_index, self.bias_index, self.shift_gather,
                   self.unshift_gather]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def nearest_layout(height: int, width: int, geometry: NearestGeometry, device: torch.device) -> NearestLayout:
    """The shared layout of the computed selection of an (height, width) map (before padding)."""
    return cached_layout(('nearest', height, width, geometry, device),
                         lambda: NearestLayout(height, width, geometry, nearest_selection(geometry, height, width),
                                               device))


OFFICIAL_SELECTION = re.compile(r'^(?P<attn>.*)\.topk_cloest_(?P<kind>indice|coords)_(?P<level>\d+)$')


def official_offset(coords: torch.Tensor, window_size: int) -> torch.Tensor:
    """The per-window offset (nW, K, 2) of an official `topk_cloest_coords_{l}` buffer (nW, ws^2, K, 2),
    which the official model builds as that offset plus each query's `window_offsets`. Raises
    ValueError where the buffer is not of that form."""
    queries = window_offsets(window_size).float()
    if coords.dim() != 4 or coords.shape[1] != len(queries) or coords.shape[-1] != 2:
        raise ValueError(f'shape {tuple(coords.shape)} is not (windows, {len(queries)}, keys, 2) for windows of '
                         f'{window_size}x{window_size}')
    offset = coords[:, 0].float() - queries[0]
    if not torch.equal(offset[:, None] + queries[None, :, None], coords.float()):
        raise ValueError("its coordinates are not a per-window key offset plus each query's offset from the "
                         "window centre, as the official model builds them")
    return offset


def selection_state_from_official(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A state dict with official Focal-fast selection buffers in this package's per-window form:
    `<attn>.topk_cloest_indice_{l}` and `<attn>.topk_cloest_coords_{l}` become `<attn>.nearest_index_{l}`
    and `<attn>.nearest_offset_{l}`; `<attn>.window_coords` (the query offsets, derived from the
    window size) goes. Other entries pass unchanged. Raises ValueError naming a malformed buffer."""
    converted, pairs = {}, {}
    for name, value in state_dict.items():
        match = OFFICIAL_SELECTION.match(name)
        if match:
            pairs.setdefault((match['attn'], int(match['level'])), {})[match['kind']] = (name, value)
        elif not name.endswith('.attn.window_coords'):
            converted[name] = value
    for (attn, level), pair in sorted(pairs.items()):
        if set(pair) != {'indice', 'coords'}:
            (name, _), = pair.values()
            partner = 'coords' if 'indice' in pair else 'indice'
            raise ValueError(f'checkpoint {name} comes without its topk_cloest_{partner}_{level}')
        (_, index), (coords_name, coords) = pair['indice'], pair['coords']
        window_area = coords.shape[1] if coords.dim() == 4 else 0
        try:
            offset = official_offset(coords, math.isqrt(window_area))
        except ValueError as error:
            raise ValueError(f'checkpoint {coords_name}: {error}') from None
        converted[f'{attn}.nearest_index_{level}'] = index
        converted[f'{attn}.nearest_offset_{level}'] = offset
    return converted
