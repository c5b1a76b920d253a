"""Keep a gather's output out of the saved activations: regather it when backward needs it.

Focal attention gathers each window's keys and values (its own tokens, the surrounding ring and
the pooled neighbours: 232 keys for 49 queries in Focal-T's first stage). The fused kernels of
`scaled_dot_product_attention` on CUDA save their key and value inputs for backward, and these
gathered copies, 4.7x the size of the keys and values they come from, would be the largest
activation of a focal block. Inside `regathered_in_backward`, any tensor saved for backward that
views the gathered storage is stored as its view geometry instead, and backward regathers it
from the source: one `index_select` more per backward pass instead of holding the copies.
(The CPU math path saves reshaped copies, not views, so there nothing changes.)
"""
import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple, Union

import torch

SavedView = Tuple[torch.Tensor, int, torch.Size, Tuple[int, ...]]  # source, storage offset, size, stride


@dataclass
class _Regather:
    source: Optional[torch.Tensor]  # detached (the regather builds no graph); None once packing ends
    dim: int
    index: torch.Tensor
    storage: int  # data pointer of the gathered tensor's storage
    saved_views: int = 0
    restored_views: int = 0
    regathered: Optional[torch.Tensor] = None

    def pack(self, tensor: torch.Tensor) -> Union[torch.Tensor, SavedView]:
        if tensor.untyped_storage().data_ptr() != self.storage:
            # Detached: a saved output returned as itself would hold its own grad_fn, a cycle
            # through C++ that Python's collector cannot free when no backward runs.
            return tensor.detach()
        self.saved_views += 1
        # The source lives in the packed views only: if the kernel saved no view of the
        # gathered tensor (e.g. it saved contiguous copies), nothing extra is kept.
        return self.source, tensor.storage_offset(), tensor.size(), tensor.stride()

    def unpack(self, packed: Union[torch.Tensor, SavedView]) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        source, offset, size, stride = packed
        if self.regathered is None:
            self.regathered = source.index_select(self.dim, self.index)
        view = self.regathered.as_strided(size, stride, offset)
        self.restored_views += 1
        if self.restored_views == self.saved_views:
            # Every view is out: the regathered tensor now lives only as long as the backward
            # node that uses them, and a second backward (retain_graph) regathers again.
            self.regathered, self.restored_views = None, 0
        return view


@contextlib.contextmanager
def regathered_in_backward(gathered: torch.Tensor, source: torch.Tensor, dim: int,
                           index: torch.Tensor) -> Iterator[None]:
    """While active, tensors saved for backward that view `gathered`, which must be
    `source.index_select(dim, index)`, are regathered from `source` in backward rather than kept.

    `source` is kept instead (the caller must not modify it in place before backward). Do not use
    inside activation checkpointing or torch.compile: their own saved-tensor handling must
    see every saved tensor. Outer saved-tensor hooks (e.g. `save_on_cpu`) do not see the
    tensors saved in here either.
    """
    try:
        storage = gathered.untyped_storage().data_ptr()
    except (NotImplementedError, RuntimeError):  # torch.func wrappers and other tensor subclasses
        storage = 0
    if storage == 0:  # no storage (meta tensors included) to tell the gathered views apart
        yield
        return
    regather = _Regather(source.detach(), dim, index, storage)
    try:
        with torch.autograd.graph.saved_tensors_hooks(regather.pack, regather.unpack):
            yield
    finally:
        regather.source = None
