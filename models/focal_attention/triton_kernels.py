"""Triton kernels of fused focal attention (see `fused` for the op around them).

One program owns one window's queries of one head. Keys and values are read in place through the
layout's key index, from the fine map (the k and v thirds of `qkv`) or from the pooled tokens, so no
gathered copy exists; positional terms come from the (heads, ws^2, S) position bias shared by all
windows, and masks from the key index (zero token: -100) and the windows' shift-region labels;
softmax is online over blocks of key slots.

Backward never adds floats atomically, so it is deterministic:
  * a program owns a run of windows of one head and visits them once per key block, summing the
    position-bias gradient of that block over its windows in registers and writing one partial
    per program (summed afterwards);
  * the query gradient of a window, spread over the key blocks, is summed in an fp32 scratch that
    only its program touches;
  * key and value gradients are written per key slot, then summed per source token in a fixed
    order by `sum_slot_gradients`, through the inverse of the key index (`KeyUsers`).

Shapes: qkv (B, T, 3C) with T = Hp * Wp tokens of the (shifted, padded) map; pooled (B, P, 2C);
out (B, T, C); lse and delta (B, T, nh) fp32.
"""
import triton
import triton.language as tl

from . import geometry

MASKED = tl.constexpr(geometry.MASKED)  # kernels may read module globals only as constexpr


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in fp32. UPCAST: multiply fp16/bf16 operands as fp32 (exact; for
    Triton's CPU interpreter, whose 16-bit products are wrong), with PRECISION 'ieee'."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _key_block_scores(q, q_region, qkv_base, pooled_base, bias_base, key_index_base, regions_base, start,
                      rows, row_ok, dims, dim_ok, stride_qkv_t, stride_pooled_t, num_fine, zero_token, channels,
                      scale, AREA: tl.constexpr, NUM_KEYS: tl.constexpr, NUM_ATTENDED: tl.constexpr,
                      HAS_POOLED: tl.constexpr, HAS_REGIONS: tl.constexpr, PRECISION: tl.constexpr,
                      UPCAST: tl.constexpr, BLOCK_N: tl.constexpr):
    """Scores (BLOCK_M, BLOCK_N) of the key slots [start, start + BLOCK_N) of one window and head,
    with their keys, values and source indices."""
    slots = start + tl.arange(0, BLOCK_N)
    slot_ok = slots < NUM_KEYS
    index = tl.load(key_index_base + slots, mask=slot_ok, other=zero_token)
    fine = (index < num_fine)[:, None] & dim_ok[None, :]
    fine_rows = qkv_base + index[:, None].to(tl.int64) * stride_qkv_t + dims[None, :]
    k = tl.load(fine_rows + channels, mask=fine, other=0.)
    v = tl.load(fine_rows + 2 * channels, mask=fine, other=0.)
    if HAS_POOLED:
        pooled = ((index >= num_fine) & (index < zero_token))[:, None] & dim_ok[None, :]
        pooled_rows = pooled_base + (index - num_fine)[:, None].to(tl.int64) * stride_pooled_t + dims[None, :]
        k += tl.load(pooled_rows, mask=pooled, other=0.)
        v += tl.load(pooled_rows + channels, mask=pooled, other=0.)

    s = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale
    s += tl.load(bias_base + rows[:, None] * NUM_KEYS + slots[None, :], mask=row_ok[:, None] & slot_ok[None, :],
                 other=0.)
    s += tl.where(index == zero_token, MASKED, 0.)[None, :]
    if HAS_REGIONS:
        k_region = tl.load(regions_base + slots, mask=slots < AREA, other=-1)
        crossing = (k_region[None, :] >= 0) & (k_region[None, :] != q_region[:, None])
        s += tl.where(crossing, MASKED, 0.)
    s = tl.where((slots < NUM_ATTENDED)[None, :], s, float('-inf'))
    return s, k, v, index, slots, slot_ok


@triton.jit
def focal_attention_forward_kernel(
        qkv_ptr, pooled_ptr, bias_ptr, key_index_ptr, regions_ptr, out_ptr, lse_ptr,
        stride_qkv_b, stride_qkv_t, stride_pooled_b, stride_pooled_t,
        num_windows, num_fine, zero_token, channels, head_dim, num_heads, scale,
        AREA: tl.constexpr, NUM_KEYS: tl.constexpr, NUM_ATTENDED: tl.constexpr, HAS_POOLED: tl.constexpr,
        HAS_REGIONS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (B * nW, nh)."""
    window = tl.program_id(0)
    head = tl.program_id(1)
    batch = (window // num_windows).to(tl.int64)
    w = window % num_windows
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < AREA
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    key_index_base = key_index_ptr + w * NUM_KEYS
    regions_base = regions_ptr + w * AREA
    qkv_base = qkv_ptr + batch * stride_qkv_b + head * head_dim
    pooled_base = pooled_ptr + batch * stride_pooled_b + head * head_dim
    bias_base = bias_ptr + head * AREA * NUM_KEYS

    tokens = tl.load(key_index_base + rows, mask=row_ok, other=0)  # a window's first keys are its queries
    q = tl.load(qkv_base + tokens[:, None].to(tl.int64) * stride_qkv_t + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.)
    q_region = tl.load(regions_base + rows, mask=row_ok, other=-1) if HAS_REGIONS else rows

    m_i = tl.full([BLOCK_M], float('-inf'), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, NUM_KEYS, BLOCK_N):
        s, k, v, index, slots, slot_ok = _key_block_scores(
            q, q_region, qkv_base, pooled_base, bias_base, key_index_base, regions_base, start, rows, row_ok,
            dims, dim_ok, stride_qkv_t, stride_pooled_t, num_fine, zero_token, channels, scale,
            AREA, NUM_KEYS, NUM_ATTENDED, HAS_POOLED, HAS_REGIONS, PRECISION, UPCAST, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new

    token_rows = batch * num_fine + tokens
    out = acc / l_i[:, None]
    tl.store(out_ptr + token_rows[:, None] * channels + head * head_dim + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(lse_ptr + token_rows * num_heads + head, m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def focal_attention_backward_kernel(
        qkv_ptr, pooled_ptr, bias_ptr, key_index_ptr, regions_ptr, grad_out_ptr, lse_ptr, delta_ptr,
        grad_qkv_ptr, grad_q_scratch_ptr, grad_slots_ptr, grad_bias_ptr,
        stride_qkv_b, stride_qkv_t, stride_pooled_b, stride_pooled_t,
        num_windows, total_windows, windows_per_program, num_fine, zero_token, channels, head_dim, num_heads,
        scale,
        AREA: tl.constexpr, NUM_KEYS: tl.constexpr, NUM_ATTENDED: tl.constexpr, HAS_POOLED: tl.constexpr,
        HAS_REGIONS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (ceil(B * nW / windows_per_program), nh). Writes the query gradient into the q third of
    grad_qkv (B, T, 3C), key/value gradients per slot into grad_slots (B * nW * S, 2C), and this
    program's position-bias gradient into grad_bias[program] (programs, nh, ws^2, S)."""
    program = tl.program_id(0)
    head = tl.program_id(1)
    first = program * windows_per_program
    last = tl.minimum(first + windows_per_program, total_windows)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < AREA
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    head_dims = head * head_dim + dims[None, :]
    bias_base = bias_ptr + head * AREA * NUM_KEYS
    num_blocks = (NUM_KEYS + BLOCK_N - 1) // BLOCK_N

    for block in range(num_blocks):
        grad_bias = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for offset in range(0, last - first):
            window = first + offset
            batch = (window // num_windows).to(tl.int64)
            w = window % num_windows
            key_index_base = key_index_ptr + w * NUM_KEYS
            regions_base = regions_ptr + w * AREA
            qkv_base = qkv_ptr + batch * stride_qkv_b + head * head_dim
            pooled_base = pooled_ptr + batch * stride_pooled_b + head * head_dim

            tokens = tl.load(key_index_base + rows, mask=row_ok, other=0)
            token_rows = batch * num_fine + tokens
            row_dim_ok = row_ok[:, None] & dim_ok[None, :]
            q = tl.load(qkv_base + tokens[:, None].to(tl.int64) * stride_qkv_t + dims[None, :], mask=row_dim_ok,
                        other=0.)
            q_region = tl.load(regions_base + rows, mask=row_ok, other=-1) if HAS_REGIONS else rows
            grad_out = tl.load(grad_out_ptr + token_rows[:, None] * channels + head_dims, mask=row_dim_ok, other=0.)
            lse = tl.load(lse_ptr + token_rows * num_heads + head, mask=row_ok, other=0.)
            delta = tl.load(delta_ptr + token_rows * num_heads + head, mask=row_ok, other=0.)

            s, k, v, index, slots, slot_ok = _key_block_scores(
                q, q_region, qkv_base, pooled_base, bias_base, key_index_base, regions_base, block * BLOCK_N, rows,
                row_ok, dims, dim_ok, stride_qkv_t, stride_pooled_t, num_fine, zero_token, channels, scale,
                AREA, NUM_KEYS, NUM_ATTENDED, HAS_POOLED, HAS_REGIONS, PRECISION, UPCAST, BLOCK_N)
            p = tl.where(row_ok[:, None], tl.exp(s - lse[:, None]), 0.)
            grad_v = _dot(tl.trans(p.to(grad_out.dtype)), grad_out, PRECISION, UPCAST)
            grad_p = _dot(grad_out, tl.trans(v), PRECISION, UPCAST)
            grad_s = p * (grad_p - delta[:, None])
            grad_bias += grad_s
            grad_k = _dot(tl.trans(grad_s.to(q.dtype)), q, PRECISION, UPCAST) * scale
            grad_q = _dot(grad_s.to(k.dtype), k, PRECISION, UPCAST) * scale

            slot_rows = (batch * num_windows + w) * NUM_KEYS + slots
            slot_dim_ok = ((index != zero_token) & slot_ok)[:, None] & dim_ok[None, :]
            grad_slots = grad_slots_ptr + slot_rows[:, None] * (2 * channels) + head_dims
            tl.store(grad_slots, grad_k.to(grad_slots_ptr.dtype.element_ty), mask=slot_dim_ok)
            tl.store(grad_slots + channels, grad_v.to(grad_slots_ptr.dtype.element_ty), mask=slot_dim_ok)

            scratch = grad_q_scratch_ptr + token_rows[:, None] * channels + head_dims
            if block > 0:
                grad_q += tl.load(scratch, mask=row_dim_ok, other=0.)
            if block < num_blocks - 1:
                tl.store(scratch, grad_q, mask=row_dim_ok)
            else:
                tl.store(grad_qkv_ptr + token_rows[:, None] * (3 * channels) + head_dims,
                         grad_q.to(grad_qkv_ptr.dtype.element_ty), mask=row_dim_ok)

        slots = block * BLOCK_N + tl.arange(0, BLOCK_N)
        partial = grad_bias_ptr + ((program * num_heads + head) * AREA + rows[:, None]) * NUM_KEYS + slots[None, :]
        tl.store(partial, grad_bias, mask=row_ok[:, None] & (slots < NUM_KEYS)[None, :])
        tl.debug_barrier()  # the next block reads the query-gradient scratch other threads wrote


@triton.jit
def sum_slot_gradients_kernel(grad_slots_ptr, offsets_ptr, slots_ptr, out_ptr, stride_out_b, stride_out_t,
                              slots_per_batch, width, BLOCK_C: tl.constexpr):
    """Grid (U, B): out[b, u] = sum of grad_slots[b * slots_per_batch + slot] over the slots that
    read source token u (slots[offsets[u]:offsets[u + 1]]), in that order."""
    token = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < width
    begin = tl.load(offsets_ptr + token)
    end = tl.load(offsets_ptr + token + 1)
    acc = tl.zeros([BLOCK_C], tl.float32)
    for user in range(begin, end):
        slot = tl.load(slots_ptr + user).to(tl.int64)
        acc += tl.load(grad_slots_ptr + (batch * slots_per_batch + slot) * width + cols, mask=col_ok, other=0.)
    tl.store(out_ptr + batch * stride_out_b + token.to(tl.int64) * stride_out_t + cols,
             acc.to(out_ptr.dtype.element_ty), mask=col_ok)
