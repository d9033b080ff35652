"""Packed-bitmask application in Triton, tuned for Hopper and correct under TRITON_INTERPRET=1.

One program masks BLOCK columns of one logits row. The mask is read a byte (8 tokens) at
a time and the tile is shaped [BLOCK // 8, 8], so every predicate is uniform over 8
contiguous logits (16 bytes of bf16): a byte of 0xFF writes nothing, a byte of 0 is one
vector store of -inf, and only mixed bytes read their logits back to keep the allowed ones.
That moves the fewest bytes the operation allows (xgrammar's kernel stores element by
element under a per-element predicate).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _apply_bitmask_kernel(
    logits_ptr, logits_stride, vocab_size,
    mask_ptr, mask_stride, mask_words,
    logit_rows_ptr, mask_rows_ptr,
    HAS_LOGIT_ROWS: tl.constexpr, HAS_MASK_ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    logit_row = pid
    mask_row = pid
    if HAS_LOGIT_ROWS:
        logit_row = tl.load(logit_rows_ptr + pid)
    if HAS_MASK_ROWS:
        mask_row = tl.load(mask_rows_ptr + pid)
    if mask_row >= 0:  # a gathered row of -1 is unconstrained
        start = tl.program_id(1) * BLOCK
        words_at = start // 32 + tl.arange(0, BLOCK // 32)
        words = tl.load(mask_ptr + mask_row.to(tl.int64) * mask_stride + words_at,
                        mask=words_at < mask_words, other=0)  # past the mask: padded vocab
        shifts = (tl.arange(0, 4) * 8)[None, :]
        mask_bytes = tl.reshape((words[:, None] >> shifts) & 0xFF, (BLOCK // 8,))
        lanes = tl.arange(0, 8)[None, :]
        cols = start + tl.arange(0, BLOCK // 8)[:, None] * 8 + lanes
        in_row = cols < vocab_size
        allowed = ((mask_bytes[:, None] >> lanes) & 1) != 0
        ptrs = logits_ptr + logit_row.to(tl.int64) * logits_stride + cols
        mixed = (mask_bytes != 0) & (mask_bytes != 0xFF)
        # Lanes not loaded are never kept (a byte of 0 allows none); float32 for the select
        # (exact for every dtype, and the interpreter has no bf16 constants).
        kept = tl.load(ptrs, mask=mixed[:, None] & in_row).to(tl.float32)
        masked = tl.where(allowed, kept, float("-inf")).to(logits_ptr.dtype.element_ty)
        tl.store(ptrs, masked, mask=(mask_bytes != 0xFF)[:, None] & in_row)


def _block_for(rows: int, vocab_size: int) -> int:
    # Enough programs to fill the chip at small batches, long rows at large ones.
    for block in (8192, 4096, 2048):
        if rows * triton.cdiv(vocab_size, block) >= 1024:
            return block
    return 1024


def apply(logits: torch.Tensor, masks: torch.Tensor, logit_rows: torch.Tensor | None,
          mask_rows: torch.Tensor | None) -> None:
    """Row i of the launch masks logits[logit_rows[i] or i] with masks[mask_rows[i] or i]."""
    rows = len(logit_rows if logit_rows is not None else
               mask_rows if mask_rows is not None else masks)
    if rows == 0:
        return
    vocab_size = logits.shape[1]
    block = _block_for(rows, vocab_size)
    _apply_bitmask_kernel[(rows, triton.cdiv(vocab_size, block))](
        logits, logits.stride(0), vocab_size,
        masks, masks.stride(0), masks.shape[1],
        logit_rows, mask_rows,
        HAS_LOGIT_ROWS=logit_rows is not None, HAS_MASK_ROWS=mask_rows is not None,
        BLOCK=block, num_warps=4 if block <= 2048 else 8,
    )
