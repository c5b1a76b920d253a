"""Triton kernels of fused focal attention (see `fused` for the op around them).

One program owns one window's queries of one head. Keys and values are read in place through the
layout's key index, from the fine map (the k and v thirds of `qkv`) or from the pooled tokens, so no
gathered copy exists; positional terms come from the (heads, ws^2, S) position bias shared by all
windows, and masks from the layout's per-slot key mask (-100 for pooled neighbours outside the map,
-inf for alignment slots) and the windows' shift-region labels. Scores are kept in log2 units:
queries are pre-scaled by scale * log2(e), the position bias comes pre-scaled by log2(e) and is the
dot's accumulator, softmax uses exp2, and the saved log-sum-exp is base 2.

Backward never adds floats atomically, so it is deterministic:
  * a program owns WINDOWS_PER_PROGRAM windows of one head and visits them once per key block,
    summing the position-bias gradient of that block over its windows in registers and writing one
    partial per program (summed afterwards). With several blocks, a window's query gradient is
    summed over them in an fp32 scratch that only its program touches;
  * rowsum(dO * O) comes from the loads of dO and O in the same kernel (at the first key block,
    kept for the others in a small scratch), not from a separate pass;
  * key and value gradients are written per key slot, then summed per source token in a fixed
    order by `sum_slot_gradients`, through the inverse of the key index (`KeyUsers`).

Loop bounds: Triton's interpreter before 3.8 cannot take a run-time `range` bound under NumPy 2
("only 0-dimensional arrays can be converted to Python scalars"), and Triton 3.0-3.2 cannot compile
a `while` loop around dots for sm_90. So the backward's window loop has a compile-time trip count
and a guard, and only `sum_slot_gradients` (no dots) has a `while` loop.

Shapes: qkv (B, T, 3C) with T = Hp * Wp tokens of the (shifted, padded) map; pooled (B, P, 2C);
out (B, T, C); lse (B, T, nh) fp32.
"""
import math

import triton
import triton.language as tl

from . import geometry

LOG2E = math.log2(math.e)  # scores in log2 units: exp(x) = exp2(x * LOG2E)
# kernels may read module globals only as constexpr
SCORE_LOG2E = tl.constexpr(LOG2E)
MASKED_LOG2 = tl.constexpr(geometry.MASKED * LOG2E)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in fp32. UPCAST: multiply fp16/bf16 operands as fp32 (exact; for Triton's CPU
    interpreter, whose 16-bit products are wrong), with PRECISION 'ieee'."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _load_queries(qkv_base, key_index_base, rows, row_ok, dims, scale, HEAD_DIM: tl.constexpr,
                  CHANNELS: tl.constexpr):
    """A window's tokens (a window's first keys are its queries), its queries and those scaled by
    scale * log2(e) for the scores."""
    tokens = tl.load(key_index_base + rows, mask=row_ok, other=0)
    q = tl.load(qkv_base + tokens[:, None].to(tl.int64) * (3 * CHANNELS) + dims[None, :],
                mask=row_ok[:, None] & (dims < HEAD_DIM)[None, :], other=0.)
    return tokens, q, (q.to(tl.float32) * (scale * SCORE_LOG2E)).to(q.dtype)


@triton.jit
def _key_block_scores(q_scaled, q_region, qkv_base, pooled_base, bias_tile, key_index_base, key_mask_base,
                      regions_base, slots, dims, num_fine, zero_token, AREA: tl.constexpr, NUM_KEYS: tl.constexpr,
                      CHANNELS: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_POOLED: tl.constexpr,
                      ALIGNED: tl.constexpr, REGION_MASK: tl.constexpr, PRECISION: tl.constexpr,
                      UPCAST: tl.constexpr):
    """Scores (BLOCK_M, BLOCK_N) in log2 units of key slots `slots` of one window and head, with
    their keys, values and which slots read a real key (not the zero token). The window's key mask
    (one value per slot) is added once. ALIGNED: key/value rows of both sources start on 16 bytes.
    REGION_MASK: the block holds own-window slots of a shifted window."""
    slot_ok = slots < NUM_KEYS
    # Masked loads here fill with zero and select after: Triton 3.0-3.2 fail to pipeline a masked load
    # filled with any other value (an 'arith.select' of mismatched layouts)
    index = tl.where(slot_ok, tl.load(key_index_base + slots, mask=slot_ok, other=0), zero_token)
    fine = index < num_fine
    key_rows = qkv_base + index.to(tl.int64) * (3 * CHANNELS) + CHANNELS  # k of a fine token; v follows at +C
    if HAS_POOLED:
        key_rows = tl.where(fine, key_rows, pooled_base + (index - num_fine).to(tl.int64) * (2 * CHANNELS))
        if ALIGNED:  # the selected rows keep the 16-byte alignment of both sources: vector loads
            key_rows = tl.multiple_of(key_rows, 16)
        present = index < zero_token
    else:
        present = fine
    mask = present[:, None] & (dims < HEAD_DIM)[None, :]
    k = tl.load(key_rows[:, None] + dims[None, :], mask=mask, other=0.)
    v = tl.load(key_rows[:, None] + CHANNELS + dims[None, :], mask=mask, other=0.)

    key_mask = tl.where(slot_ok, tl.load(key_mask_base + slots, mask=slot_ok, other=0.), float('-inf')) * SCORE_LOG2E
    s = _dot(q_scaled, tl.trans(k), bias_tile, PRECISION, UPCAST) + key_mask[None, :]
    if REGION_MASK:
        own = slots < AREA
        k_region = tl.where(own, tl.load(regions_base + slots, mask=own, other=0), -1)
        crossing = (k_region[None, :] >= 0) & (k_region[None, :] != q_region[:, None])
        s += tl.where(crossing, MASKED_LOG2, 0.)
    return s, k, v, present


@triton.jit
def _load_bias(bias_base, rows, row_ok, slots, NUM_KEYS: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) position-bias tile of key slots `slots` (log2 units)."""
    return tl.load(bias_base + rows[:, None] * NUM_KEYS + slots[None, :],
                   mask=row_ok[:, None] & (slots < NUM_KEYS)[None, :], other=0.)


@triton.jit
def _forward_block(m_i, l_i, acc, q_scaled, q_region, qkv_base, pooled_base, bias_base, key_index_base,
                   key_mask_base, regions_base, start, rows, row_ok, dims, num_fine, zero_token, AREA: tl.constexpr,
                   NUM_KEYS: tl.constexpr, CHANNELS: tl.constexpr,
                   HEAD_DIM: tl.constexpr, HAS_POOLED: tl.constexpr, ALIGNED: tl.constexpr,
                   REGION_MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr):
    """One step of the online softmax over key slots [start, start + BLOCK_N)."""
    slots = start + tl.arange(0, BLOCK_N)
    s, k, v, present = _key_block_scores(
        q_scaled=q_scaled, q_region=q_region, qkv_base=qkv_base, pooled_base=pooled_base,
        bias_tile=_load_bias(bias_base, rows, row_ok, slots, NUM_KEYS), key_index_base=key_index_base,
        key_mask_base=key_mask_base, regions_base=regions_base, slots=slots, dims=dims, num_fine=num_fine,
        zero_token=zero_token, AREA=AREA, NUM_KEYS=NUM_KEYS, CHANNELS=CHANNELS, HEAD_DIM=HEAD_DIM,
        HAS_POOLED=HAS_POOLED, ALIGNED=ALIGNED, REGION_MASK=REGION_MASK, PRECISION=PRECISION, UPCAST=UPCAST)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)
    return m_new, l_i, acc


@triton.jit
def focal_attention_forward_kernel(
        qkv_ptr, pooled_ptr, bias_ptr, key_index_ptr, key_mask_ptr, regions_ptr, out_ptr, lse_ptr,
        num_windows, num_fine, zero_token, scale,
        AREA: tl.constexpr, NUM_KEYS: tl.constexpr, CHANNELS: tl.constexpr,
        HEAD_DIM: tl.constexpr, HAS_POOLED: tl.constexpr, HAS_REGIONS: tl.constexpr, ALIGNED: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr):
    """Grid (B * nW, nh). bias (nh, ws^2, S) in log2 units, key_mask (nW, S) the layout's additive mask
    per key slot; lse written in log2 units."""
    window = tl.program_id(0)
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    batch = (window // num_windows).to(tl.int64)
    w = window % num_windows
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < AREA
    dims = tl.arange(0, BLOCK_D)
    key_index_base = key_index_ptr + w * NUM_KEYS
    key_mask_base = key_mask_ptr + w * NUM_KEYS
    regions_base = regions_ptr + w * AREA
    qkv_base = qkv_ptr + batch * num_fine * (3 * CHANNELS) + head * HEAD_DIM
    pooled_base = pooled_ptr + batch * (zero_token - num_fine) * (2 * CHANNELS) + head * HEAD_DIM
    bias_base = bias_ptr + head * AREA * NUM_KEYS

    tokens, q, q_scaled = _load_queries(qkv_base, key_index_base, rows, row_ok, dims, scale, HEAD_DIM, CHANNELS)
    q_region = tl.load(regions_base + rows, mask=row_ok, other=-1) if HAS_REGIONS else rows

    m_i = tl.full([BLOCK_M], float('-inf'), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Blocks holding own-window slots (the first AREA) apply the region mask of a shifted window.
    own_end: tl.constexpr = (AREA + BLOCK_N - 1) // BLOCK_N * BLOCK_N if HAS_REGIONS else 0
    for start in range(0, own_end, BLOCK_N):
        m_i, l_i, acc = _forward_block(
            m_i=m_i, l_i=l_i, acc=acc, q_scaled=q_scaled, q_region=q_region, qkv_base=qkv_base,
            pooled_base=pooled_base, bias_base=bias_base, key_index_base=key_index_base, key_mask_base=key_mask_base,
            regions_base=regions_base, start=start, rows=rows, row_ok=row_ok, dims=dims, num_fine=num_fine,
            zero_token=zero_token, AREA=AREA, NUM_KEYS=NUM_KEYS, CHANNELS=CHANNELS, HEAD_DIM=HEAD_DIM,
            HAS_POOLED=HAS_POOLED, ALIGNED=ALIGNED, REGION_MASK=True, PRECISION=PRECISION, UPCAST=UPCAST,
            BLOCK_N=BLOCK_N)
    for start in range(own_end, NUM_KEYS, BLOCK_N):
        m_i, l_i, acc = _forward_block(
            m_i=m_i, l_i=l_i, acc=acc, q_scaled=q_scaled, q_region=q_region, qkv_base=qkv_base,
            pooled_base=pooled_base, bias_base=bias_base, key_index_base=key_index_base, key_mask_base=key_mask_base,
            regions_base=regions_base, start=start, rows=rows, row_ok=row_ok, dims=dims, num_fine=num_fine,
            zero_token=zero_token, AREA=AREA, NUM_KEYS=NUM_KEYS, CHANNELS=CHANNELS, HEAD_DIM=HEAD_DIM,
            HAS_POOLED=HAS_POOLED, ALIGNED=ALIGNED, REGION_MASK=False, PRECISION=PRECISION, UPCAST=UPCAST,
            BLOCK_N=BLOCK_N)

    token_rows = batch * num_fine + tokens
    out = acc / l_i[:, None]
    tl.store(out_ptr + token_rows[:, None] * CHANNELS + head * HEAD_DIM + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (dims < HEAD_DIM)[None, :])
    tl.store(lse_ptr + token_rows * num_heads + head, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _backward_window(grad_bias, batch, w, block, head, num_heads, qkv_ptr, pooled_ptr, bias_base, key_index_ptr,
                     key_mask_ptr, regions_ptr, out_ptr, grad_out_ptr, lse_ptr, delta_ptr, grad_qkv_ptr,
                     grad_q_scratch_ptr, grad_slots_ptr, num_windows, num_fine, zero_token, scale, rows, row_ok,
                     dims, AREA: tl.constexpr, NUM_KEYS: tl.constexpr, CHANNELS: tl.constexpr,
                     HEAD_DIM: tl.constexpr, HAS_POOLED: tl.constexpr, HAS_REGIONS: tl.constexpr,
                     ALIGNED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """Key block `block` of window w of image `batch`, one head: writes the key/value gradients of its
    slots and the query gradient (or its partial sum, with several blocks); returns grad_bias plus
    this block's position-bias gradient. rowsum(dO * O) is computed at the first block and, with
    several, kept for the others in delta (B, T, nh) fp32."""
    num_blocks: tl.constexpr = (NUM_KEYS + BLOCK_N - 1) // BLOCK_N
    slots = block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_dim_ok = row_ok[:, None] & (dims < HEAD_DIM)[None, :]
    head_dims = head * HEAD_DIM + dims[None, :]
    key_index_base = key_index_ptr + w * NUM_KEYS
    key_mask_base = key_mask_ptr + w * NUM_KEYS
    regions_base = regions_ptr + w * AREA
    qkv_base = qkv_ptr + batch * num_fine * (3 * CHANNELS) + head * HEAD_DIM
    pooled_base = pooled_ptr + batch * (zero_token - num_fine) * (2 * CHANNELS) + head * HEAD_DIM

    tokens, q, q_scaled = _load_queries(qkv_base, key_index_base, rows, row_ok, dims, scale, HEAD_DIM, CHANNELS)
    q_region = tl.load(regions_base + rows, mask=row_ok, other=-1) if HAS_REGIONS else rows
    token_rows = batch * num_fine + tokens
    grad_out = tl.load(grad_out_ptr + token_rows[:, None] * CHANNELS + head_dims, mask=row_dim_ok, other=0.)
    if block == 0:
        out = tl.load(out_ptr + token_rows[:, None] * CHANNELS + head_dims, mask=row_dim_ok, other=0.)
        delta = tl.sum(grad_out.to(tl.float32) * out.to(tl.float32), 1)
        if num_blocks > 1:
            tl.store(delta_ptr + token_rows * num_heads + head, delta, mask=row_ok)
    else:  # the first block's
        delta = tl.load(delta_ptr + token_rows * num_heads + head, mask=row_ok, other=0.)
    # padded query rows get an infinite log-sum-exp: their probabilities are 0
    lse = tl.load(lse_ptr + token_rows * num_heads + head, mask=row_ok, other=float('inf'))

    s, k, v, present = _key_block_scores(
        q_scaled=q_scaled, q_region=q_region, qkv_base=qkv_base, pooled_base=pooled_base,
        bias_tile=_load_bias(bias_base, rows, row_ok, slots, NUM_KEYS), key_index_base=key_index_base,
        key_mask_base=key_mask_base, regions_base=regions_base, slots=slots, dims=dims, num_fine=num_fine,
        zero_token=zero_token, AREA=AREA, NUM_KEYS=NUM_KEYS, CHANNELS=CHANNELS, HEAD_DIM=HEAD_DIM,
        HAS_POOLED=HAS_POOLED, ALIGNED=ALIGNED, REGION_MASK=HAS_REGIONS, PRECISION=PRECISION, UPCAST=UPCAST)
    p = tl.exp2(s - lse[:, None])
    grad_v = _dot(tl.trans(p.to(grad_out.dtype)), grad_out, tl.zeros([BLOCK_N, BLOCK_D], tl.float32), PRECISION,
                  UPCAST)
    grad_p = _dot(grad_out, tl.trans(v), tl.zeros(s.shape, tl.float32), PRECISION, UPCAST)
    grad_s = p * (grad_p - delta[:, None])
    grad_k = _dot(tl.trans(grad_s.to(q.dtype)), q, tl.zeros([BLOCK_N, BLOCK_D], tl.float32), PRECISION,
                  UPCAST) * scale
    grad_q = _dot(grad_s.to(k.dtype), k, tl.zeros([s.shape[0], BLOCK_D], tl.float32), PRECISION, UPCAST) * scale

    slot_rows = (batch * num_windows + w) * NUM_KEYS + slots
    slot_ok = present[:, None] & (dims < HEAD_DIM)[None, :]
    grad_slots = grad_slots_ptr + slot_rows[:, None] * (2 * CHANNELS) + head_dims
    tl.store(grad_slots, grad_k.to(grad_slots_ptr.dtype.element_ty), mask=slot_ok)
    tl.store(grad_slots + CHANNELS, grad_v.to(grad_slots_ptr.dtype.element_ty), mask=slot_ok)

    grad_q_rows = grad_qkv_ptr + token_rows[:, None] * (3 * CHANNELS) + head_dims
    if num_blocks == 1:
        tl.store(grad_q_rows, grad_q.to(grad_qkv_ptr.dtype.element_ty), mask=row_dim_ok)
    else:
        scratch = grad_q_scratch_ptr + token_rows[:, None] * CHANNELS + head_dims
        if block > 0:
            grad_q += tl.load(scratch, mask=row_dim_ok, other=0.)
        if block < num_blocks - 1:
            tl.store(scratch, grad_q, mask=row_dim_ok)
        else:
            tl.store(grad_q_rows, grad_q.to(grad_qkv_ptr.dtype.element_ty), mask=row_dim_ok)
    return grad_bias + grad_s


@triton.jit
def focal_attention_backward_kernel(
        qkv_ptr, pooled_ptr, bias_ptr, key_index_ptr, key_mask_ptr, regions_ptr, out_ptr, grad_out_ptr, lse_ptr,
        delta_ptr, grad_qkv_ptr, grad_q_scratch_ptr, grad_slots_ptr, grad_bias_ptr,
        num_windows, total_windows, num_fine, zero_token, scale,
        AREA: tl.constexpr, NUM_KEYS: tl.constexpr, CHANNELS: tl.constexpr,
        HEAD_DIM: tl.constexpr, HAS_POOLED: tl.constexpr, HAS_REGIONS: tl.constexpr, ALIGNED: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, WINDOWS_PER_PROGRAM: tl.constexpr):
    """Grid (ceil(B * nW / WINDOWS_PER_PROGRAM), nh). Writes the query gradient into the q third of
    grad_qkv (B, T, 3C), key/value gradients per slot into grad_slots (B * nW * S, 2C), and this
    program's position-bias gradient into grad_bias[program] (programs, nh, ws^2, S). bias and lse
    in log2 units, as the forward takes and writes them. The window loop has a compile-time trip
    count: Triton 3.0-3.2 cannot compile a `while` loop around the dots for sm_90, and interpreters
    before 3.8 cannot take a run-time `range` under NumPy 2."""
    program = tl.program_id(0)
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < AREA
    bias_base = bias_ptr + head * AREA * NUM_KEYS
    for block in range((NUM_KEYS + BLOCK_N - 1) // BLOCK_N):
        grad_bias = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for offset in range(WINDOWS_PER_PROGRAM):
            window = program * WINDOWS_PER_PROGRAM + offset
            if window < total_windows:
                grad_bias = _backward_window(
                    grad_bias=grad_bias, batch=(window // num_windows).to(tl.int64), w=window % num_windows,
                    block=block, head=head, num_heads=num_heads, qkv_ptr=qkv_ptr, pooled_ptr=pooled_ptr,
                    bias_base=bias_base, key_index_ptr=key_index_ptr, key_mask_ptr=key_mask_ptr,
                    regions_ptr=regions_ptr, out_ptr=out_ptr, grad_out_ptr=grad_out_ptr, lse_ptr=lse_ptr,
                    delta_ptr=delta_ptr, grad_qkv_ptr=grad_qkv_ptr, grad_q_scratch_ptr=grad_q_scratch_ptr,
                    grad_slots_ptr=grad_slots_ptr, num_windows=num_windows, num_fine=num_fine,
                    zero_token=zero_token, scale=scale, rows=rows, row_ok=row_ok, dims=tl.arange(0, BLOCK_D),
                    AREA=AREA, NUM_KEYS=NUM_KEYS, CHANNELS=CHANNELS, HEAD_DIM=HEAD_DIM, HAS_POOLED=HAS_POOLED,
                    HAS_REGIONS=HAS_REGIONS, ALIGNED=ALIGNED, PRECISION=PRECISION, UPCAST=UPCAST, BLOCK_N=BLOCK_N,
                    BLOCK_D=BLOCK_D)
        slots = block * BLOCK_N + tl.arange(0, BLOCK_N)
        partial = grad_bias_ptr + ((program * num_heads + head) * AREA + rows[:, None]) * NUM_KEYS + slots[None, :]
        tl.store(partial, grad_bias, mask=row_ok[:, None] & (slots < NUM_KEYS)[None, :])
        if NUM_KEYS > BLOCK_N:
            tl.debug_barrier()  # the next block reads the scratches other threads wrote


@triton.jit
def sum_slot_gradients_kernel(grad_slots_ptr, offsets_ptr, slots_ptr, out_ptr, stride_out_b, stride_out_t,
                              num_tokens, slots_per_batch, width, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid (ceil(U / BLOCK_T), B): out[b, u] = sum of grad_slots[b * slots_per_batch + slot] over the
    slots that read source token u (slots[offsets[u]:offsets[u + 1]]), in that order."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    batch = tl.program_id(1).to(tl.int64)
    token_ok = tokens < num_tokens
    cols = tl.arange(0, BLOCK_C)
    tile_ok = token_ok[:, None] & (cols < width)[None, :]
    begin = tl.load(offsets_ptr + tokens, mask=token_ok, other=0)
    count = tl.load(offsets_ptr + tokens + 1, mask=token_ok, other=0) - begin
    acc = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    most = tl.max(count, 0)
    user = 0
    while user < most:
        used = user < count
        slot = tl.load(slots_ptr + begin + user, mask=used, other=0)
        rows = grad_slots_ptr + (batch * slots_per_batch + slot.to(tl.int64))[:, None] * width + cols[None, :]
        acc += tl.load(rows, mask=used[:, None] & tile_ok, other=0.)
        user += 1
    tl.store(out_ptr + batch * stride_out_b + tokens[:, None].to(tl.int64) * stride_out_t + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=tile_ok)
