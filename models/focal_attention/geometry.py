"""Which keys each focal attention window sees and in what order, and the position-bias terms
they get: one description of the key order (`FocalGeometry.key_groups`) from which both the index
maps of a feature map (`WindowLayout`) and the position-bias index (`position_bias_index`) are built.

Every window of ws x ws queries attends to, in this key order:
  * WINDOW: its own ws^2 tokens, with Swin's relative position terms (a (2ws-1)^2 table) and,
    in a shifted block, Swin's region mask,
  * SURROUNDINGS: the ring of `expand_size` tokens gathered from four corner-shifted windows that
    wrap around the map cyclically, as the official `torch.roll`s do; a free term per query and key,
  * POOLED, for each pooled level k: the pooled tokens of a (focal_window + 2^k - 1)^2 neighbourhood
    of sub-windows, as the official stride-2^k unfold takes them, with relative position terms
    between the window and that neighbourhood; neighbours outside the map are a zero key masked by -100,
  * zero keys masked by -inf up to a multiple of KEY_ALIGNMENT.

`FocalGeometry.of_block` turns a block's official arguments into its geometry (the one place where
small maps shrink the window and focal levels become pooled levels); `stage_block_shift_and_expand`
says which blocks of a stage shift and which expand.

A `WindowLayout` holds the key order for one map size in compact form: a (nW, S) map into the
key/value source [fine map tokens, pooled tokens of each level, one zero token] and the region label
of each window token. Layouts depend only on geometry, so every block with the same geometry shares
one, from a bounded least-recently-used cache (`window_layout`).
"""
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, TypeVar

import torch
from torch.utils._python_dispatch import _disable_current_modes  # leaves fake and tracing modes

MASKED = -100.0  # the official code's additive mask value (not -inf: a fully masked row stays finite)
KEY_ALIGNMENT = 8  # keys per window rounded up to this: bias rows of 16-byte multiples in bf16/fp16
MAX_CACHED_LAYOUTS = 64  # map sizes x geometries kept; the least recently used is dropped beyond


def relative_position_index(query_size: int, key_size: int) -> torch.Tensor:
    """Index into a ((query_size + key_size - 1) ** 2)-entry bias table for every (query, key)
    pair of a query_size x query_size window and a key_size x key_size window, aligned at their
    top-left corners. Returns (query_size**2, key_size**2) long."""
    q = torch.stack(torch.meshgrid(torch.arange(query_size), torch.arange(query_size), indexing='ij')).flatten(1)
    k = torch.stack(torch.meshgrid(torch.arange(key_size), torch.arange(key_size), indexing='ij')).flatten(1)
    rel = q[:, :, None] - k[:, None, :] + (key_size - 1)
    return rel[0] * (query_size + key_size - 1) + rel[1]


def num_surrounding_keys(window_size: int, expand_size: int) -> int:
    """Fine surrounding keys of a window: 4 corner shifts, each keeping the tokens it moves out."""
    return 4 * window_size ** 2 - 4 * (window_size - expand_size) ** 2 if expand_size > 0 else 0


def window_token_offsets(window_size: int) -> torch.Tensor:
    """Offsets (dy, dx) of a window's own tokens from its top-left token, row-major: (ws^2, 2)."""
    r, c = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing='ij')
    return torch.stack([r.flatten(), c.flatten()], 1)


def surrounding_offsets(window_size: int, expand_size: int) -> torch.Tensor:
    """Offsets (dy, dx), relative to a window's top-left token, of its fine-grained surroundings,
    in the official key order: for the four corner shifts (+e,+e), (+e,-e), (-e,+e), (-e,-e), the
    window positions whose shifted token falls outside the window. Returns (4*ws^2 - 4*(ws-e)^2, 2)."""
    ws, e = window_size, expand_size
    r, c = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing='ij')
    offsets = []
    for dy, dx in ((e, e), (e, -e), (-e, e), (-e, -e)):
        outside_rows = r >= ws - e if dy > 0 else r < e
        outside_cols = c >= ws - e if dx > 0 else c < e
        keep = (outside_rows | outside_cols).flatten()
        offsets.append(torch.stack([r.flatten() + dy, c.flatten() + dx], 1)[keep])
    return torch.cat(offsets)


def pooled_key_size(focal_window: int, level: int) -> int:
    """Side of the square neighbourhood of pooled tokens a window attends to at pooled level k."""
    return focal_window + 2 ** level - 1


def pooled_neighbourhood(num_windows: Tuple[int, int], focal_window: int,
                         level: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flat positions in the pooled map of level k of each window's pooled keys, and whether each
    lies inside the map. The pooled map has (nWh * 2^k, nWw * 2^k) tokens; window (wy, wx) sees the
    pooled_key_size(fw, k)^2 tokens starting at (wy * 2^k - pad, wx * 2^k - pad), the neighbourhood
    the official stride-2^k unfold takes. Returns two (nW, K^2) tensors: long positions, bool valid."""
    nwh, nww = num_windows
    stride = 2 ** level
    kernel = 2 * (focal_window // 2) + 2 * stride - 1
    pad = kernel // 2
    size = pooled_key_size(focal_window, level)
    first = kernel - size  # the unfold keeps kernel positions >= 2^k - 1
    ky, kx = torch.meshgrid(torch.arange(size) + first - pad, torch.arange(size) + first - pad, indexing='ij')
    wy, wx = torch.meshgrid(torch.arange(nwh) * stride, torch.arange(nww) * stride, indexing='ij')
    py = wy.reshape(-1, 1) + ky.reshape(1, -1)
    px = wx.reshape(-1, 1) + kx.reshape(1, -1)
    height, width = nwh * stride, nww * stride
    valid = (py >= 0) & (py < height) & (px >= 0) & (px < width)
    return py.clamp(0, height - 1) * width + px.clamp(0, width - 1), valid


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, ws, ws, C), windows in row-major order; H, W multiples of ws."""
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, C)


def shift_regions(height: int, width: int, window_size: int, shift_size: int) -> torch.Tensor:
    """Swin's image regions of a (height, width) map already rolled by -shift_size, per window:
    tokens of different regions must not attend to each other. Returns (nW, ws^2) int32 labels."""
    region = torch.zeros(height, width, dtype=torch.int32)
    bounds = (0, -window_size, -shift_size, None)
    label = 0
    for h0, h1 in zip(bounds[:-1], bounds[1:]):
        for w0, w1 in zip(bounds[:-1], bounds[1:]):
            region[h0:h1, w0:w1] = label
            label += 1
    return window_partition(region[None, :, :, None], window_size).flatten(1)


def shift_gathers(height: int, width: int, padded_size: Tuple[int, int], shift: int,
                  device: torch.device) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The token gathers that replace a shifted block's two cyclic rolls of its padded map: the
    first, (Hp*Wp,), rolls the padded map by -shift; the second, (H*W,), rolls it back and crops
    the padding. (None, None) without shift."""
    if not shift:
        return None, None
    padded_h, padded_w = padded_size
    r, c = torch.arange(padded_h), torch.arange(padded_w)
    shifted = ((r[:, None] + shift) % padded_h) * padded_w + (c[None, :] + shift) % padded_w
    restored = ((r[:height, None] - shift) % padded_h) * padded_w + (c[None, :width] - shift) % padded_w
    return shifted.flatten().to(device), restored.flatten().to(device)


WINDOW, SURROUNDINGS, POOLED = 'window', 'surroundings', 'pooled'  # the kinds of key group, in key order
UNEXPANDED_PARITY = {'all': None, 'even': 0, 'odd': 1}  # expand_layer -> parity of the blocks without surroundings


@dataclass(frozen=True)
class KeyGroup:
    """One run of consecutive key slots of every window and the position-bias table its terms come
    from. kind: WINDOW, SURROUNDINGS or POOLED; level: the pooled level k (0 for the others);
    num_keys: slots; table_size: entries per head of its table."""
    kind: str
    level: int
    num_keys: int
    table_size: int


@dataclass(frozen=True)
class FocalGeometry:
    """What decides a block's key sets: its window, surroundings, pooled levels and shift, already
    normalised (see `of_block`). Blocks of equal geometry share their layouts."""
    window_size: int
    expand_size: int
    focal_window: int
    num_pooled_levels: int
    shift_size: int

    def __post_init__(self):
        if not 0 <= self.shift_size < self.window_size:
            raise ValueError(f'shift_size {self.shift_size} must lie in [0, window_size {self.window_size})')

    @classmethod
    def of_block(cls, input_resolution: Tuple[int, int], window_size: int, expand_size: int, shift_size: int,
                 focal_window: int, focal_level: int, pool_method: str) -> 'FocalGeometry':
        """The geometry of a block with the official block arguments: a map no larger than the
        window (at `input_resolution`, the size the model is built for) shrinks the window to the
        map, without surroundings or shift; focal_level 0 has no surroundings; focal_level L has
        L - 1 pooled levels, none with pool_method 'none'."""
        if min(input_resolution) <= window_size:
            window_size, expand_size, shift_size = min(input_resolution), 0, 0
        return cls(window_size=window_size, expand_size=expand_size if focal_level > 0 else 0,
                   focal_window=focal_window,
                   num_pooled_levels=focal_level - 1 if pool_method != 'none' and focal_level > 1 else 0,
                   shift_size=shift_size)

    @property
    def num_surrounding_keys(self) -> int:
        return num_surrounding_keys(self.window_size, self.expand_size)

    @property
    def key_groups(self) -> Tuple[KeyGroup, ...]:
        """The key order of every window, group by group (see the module docstring)."""
        ws, area = self.window_size, self.window_size ** 2
        groups = [KeyGroup(WINDOW, 0, area, (2 * ws - 1) ** 2)]
        if self.num_surrounding_keys:
            groups.append(KeyGroup(SURROUNDINGS, 0, self.num_surrounding_keys, area * self.num_surrounding_keys))
        for level in range(self.num_pooled_levels):
            side = pooled_key_size(self.focal_window, level)
            groups.append(KeyGroup(POOLED, level, side * side, (ws + side - 1) ** 2))
        return tuple(groups)

    @property
    def num_attended_keys(self) -> int:
        return sum(group.num_keys for group in self.key_groups)

    @property
    def num_keys(self) -> int:
        """Key slots per window, padded to KEY_ALIGNMENT."""
        return math.ceil(self.num_attended_keys / KEY_ALIGNMENT) * KEY_ALIGNMENT

    def position_bias_index(self) -> torch.Tensor:
        """(ws^2, num_keys) long: the position term of each query and key slot, as an entry of the
        key groups' tables, each (heads, table_size), concatenated in key order. Alignment slots
        read entry 0 (their keys are masked by -inf)."""
        ws = self.window_size
        index, offset = [], 0
        for group in self.key_groups:
            if group.kind == WINDOW:
                group_index = relative_position_index(ws, ws)
            elif group.kind == SURROUNDINGS:
                group_index = torch.arange(group.table_size).view(ws * ws, group.num_keys)
            else:
                group_index = relative_position_index(ws, pooled_key_size(self.focal_window, group.level))
            index.append(offset + group_index)
            offset += group.table_size
        index.append(torch.zeros(ws * ws, self.num_keys - self.num_attended_keys, dtype=torch.long))
        return torch.cat(index, 1)


def stage_block_shift_and_expand(index: int, window_size: int, expand_size: int, use_shift: bool,
                                 expand_layer: str) -> Tuple[int, int]:
    """(shift_size, expand_size) of block `index` of a stage, alternating as the official stages do:
    with use_shift the odd blocks shift by half a window; expand_layer 'even' / 'odd' leaves the
    even / odd blocks without surroundings ('all': every block has them)."""
    shift_size = window_size // 2 if use_shift and index % 2 == 1 else 0
    return shift_size, 0 if index % 2 == UNEXPANDED_PARITY[expand_layer] else expand_size


class KeyUsers:
    """The inverse of a key index map, for summing key/value gradients per source token without
    atomics: source token u is read by the flat key slots (window * S + slot)
    slots[offsets[u]:offsets[u + 1]], in increasing order. Built from `source_index`, (nW, S)
    positions into the U source tokens, -1 where a slot reads another source.
    offsets: (U + 1,) int32; slots: (slots used,) int32."""

    def __init__(self, source_index: torch.Tensor, num_sources: int):
        flat = source_index.flatten().long()
        used = flat >= 0
        order = torch.argsort(flat.masked_fill(~used, num_sources), stable=True)
        counts = torch.bincount(flat[used], minlength=num_sources)
        self.offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
        self.slots = order[:int(used.sum())].to(torch.int32)


class WindowLayout:
    """Everything about one (H, W) map that a focal attention layer of one geometry needs, in
    compact form (nothing per block, head or query-key pair):

    key_index: (nW, S) int32 positions into the key/value source [Hp*Wp fine tokens, pooled tokens
        of each level, one zero token at `zero_token`]. Pooled neighbours outside the map and the
        alignment slots (>= num_attended) point at the zero token.
    key_mask: (nW, S) float additive mask of each key slot, the same for all of a window's queries:
        -100 for pooled neighbours outside the map, -inf for alignment slots, else 0.
    regions: (nW, ws^2) int32 shift-region labels of each window's tokens, or None without shift
        (tokens of different regions mask each other with -100, see `region_mask`).
    shift_gather / unshift_gather: (Hp*Wp,) / (H*W,) token gathers that replace the two cyclic
        rolls of a shifted block (the second also crops the padding); None without shift.
    fine_users / pooled_users: which key slots read each fine and each pooled token (`KeyUsers`),
        for a backward that sums key and value gradients per source token.
    backend_choices: the attention backend chosen for this layout's geometry and device, per kind of
        input; filled by `backends.choose_backend` (a plain attribute, which compiled graphs read).
    """
    position_bias_per_window = False  # one (nH, ws^2, S) set of position terms serves every window

    def __init__(self, height: int, width: int, geometry: FocalGeometry, device: torch.device):
        ws, shift = geometry.window_size, geometry.shift_size
        padded_h, padded_w = math.ceil(height / ws) * ws, math.ceil(width / ws) * ws
        nwh, nww = padded_h // ws, padded_w // ws
        num_windows = nwh * nww
        rows, cols = torch.meshgrid(torch.arange(nwh) * ws, torch.arange(nww) * ws, indexing='ij')
        rows, cols = rows.reshape(-1, 1), cols.reshape(-1, 1)

        num_fine = padded_h * padded_w
        level_bases = [num_fine]  # where each pooled level's tokens start in the key/value source
        for level in range(geometry.num_pooled_levels):
            level_bases.append(level_bases[-1] + num_windows * 4 ** level)
        zero_token = level_bases[-1]
        key_index = []
        for group in geometry.key_groups:
            if group.kind == POOLED:
                position, valid = pooled_neighbourhood((nwh, nww), geometry.focal_window, group.level)
                key_index.append(torch.where(valid, level_bases[group.level] + position, zero_token))
                continue
            if group.kind == WINDOW:
                offsets = window_token_offsets(ws)
            else:
                offsets = surrounding_offsets(ws, geometry.expand_size)
            fine_rows = (rows + offsets[:, 0]) % padded_h  # wrapping as the official torch.roll does
            fine_cols = (cols + offsets[:, 1]) % padded_w
            key_index.append(fine_rows * padded_w + fine_cols)
        key_index.append(torch.full((num_windows, geometry.num_keys - geometry.num_attended_keys), zero_token))

        self.geometry = geometry
        self.size = (height, width)
        self.padded_size = (padded_h, padded_w)
        self.num_windows = num_windows
        self.window_area = ws * ws
        self.num_keys = geometry.num_keys
        self.num_attended = geometry.num_attended_keys
        self.num_fine = num_fine
        self.zero_token = zero_token
        self.key_index = torch.cat(key_index, 1).to(device=device, dtype=torch.int32)
        self.key_mask = torch.where(self.key_index == zero_token, MASKED, 0.)
        self.key_mask[:, self.num_attended:] = float('-inf')
        self.regions = shift_regions(padded_h, padded_w, ws, shift).to(device) if shift else None
        self.shift_gather, self.unshift_gather = shift_gathers(height, width, self.padded_size, shift, device)
        index = self.key_index.long()
        self.fine_users = KeyUsers(index.masked_fill(index >= self.num_fine, -1), self.num_fine)
        not_pooled = (index < self.num_fine) | (index == zero_token)
        self.pooled_users = KeyUsers((index - self.num_fine).masked_fill(not_pooled, -1), zero_token - self.num_fine)
        self.backend_choices: Dict[tuple, str] = {}

    def region_mask(self) -> torch.Tensor:
        """(nW, ws^2, ws^2) additive mask between a shifted window's own tokens: -100 across
        image regions, else 0."""
        return torch.where(self.regions[:, :, None] != self.regions[:, None, :], MASKED, 0.)

    def to(self, device: torch.device) -> 'WindowLayout':
        """This layout with its tensors moved to `device`."""
        for name in ('key_index', 'key_mask', 'regions', 'shift_gather', 'unshift_gather'):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        for users in (self.fine_users, self.pooled_users):
            users.offsets, users.slots = users.offsets.to(device), users.slots.to(device)
        return self

    def nbytes(self) -> int:
        """Bytes held by the layout's tensors."""
        tensors = [self.key_index, self.key_mask, self.regions, self.shift_gather, self.unshift_gather,
                   self.fine_users.offsets, self.fine_users.slots, self.pooled_users.offsets, self.pooled_users.slots]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


_LAYOUTS: 'OrderedDict[tuple, Any]' = OrderedDict()  # WindowLayout or nearest.NearestLayout
Layout = TypeVar('Layout')


@torch.compiler.disable
def build_eagerly(build: Callable[[], Layout]) -> Layout:
    """`build()` outside any compiled graph, as ordinary tensors even when first asked for under
    inference mode (so the layout can serve a later training step), and as real tensors under
    torch.export, which runs the forward on fake tensors: the maps are constants of the map size
    (their sizes would be data-dependent there), and the exported graph holds them as such. New
    tensors default to the CPU (not to a default device such as `torch.device('meta')`'s): layouts
    are computed there and moved."""
    with _disable_current_modes(), torch.device('cpu'), torch.inference_mode(False), torch.no_grad():
        return build()


def cached_layout(key: tuple, build: Callable[[], Layout]) -> Layout:
    """The layout cached under `key` (map size, geometry, device), built by `build` on a miss; the
    least recently used beyond MAX_CACHED_LAYOUTS is dropped."""
    layout = _LAYOUTS.get(key)
    if layout is None:
        return _build_and_cache(key, build)
    if not torch.compiler.is_compiling():
        _LAYOUTS.move_to_end(key)
    return layout


@torch.compiler.disable
def _build_and_cache(key: tuple, build: Callable[[], Layout]) -> Layout:
    layout = _LAYOUTS[key] = build_eagerly(build)
    while len(_LAYOUTS) > MAX_CACHED_LAYOUTS:
        _LAYOUTS.popitem(last=False)
    return layout


def window_layout(height: int, width: int, geometry: FocalGeometry, device: torch.device) -> WindowLayout:
    """The shared layout of a (height, width) map (before padding to window multiples). Meta
    tensors hold no values to select by (the key users' inversion): for the meta device it is
    built on the CPU, then moved."""
    build_on = torch.device('cpu') if device.type == 'meta' else device
    return cached_layout((height, width, geometry, device),
                         lambda: WindowLayout(height, width, geometry, build_on).to(device))


def clear_layout_cache() -> None:
    """Drop every cached layout (they are rebuilt on demand)."""
    _LAYOUTS.clear()


def layout_cache_stats() -> Tuple[int, int]:
    """(layouts cached, bytes their tensors hold)."""
    return len(_LAYOUTS), sum(layout.nbytes() for layout in _LAYOUTS.values())
