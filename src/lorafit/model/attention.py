"""Block-causal attention for bf16 training on CPUs: faster than PyTorch's CPU flash kernel, and
memory linear in the sequence length.

Attention here is three bf16 kernels that oneDNN runs near peak: a batched GEMM, a fused softmax
and a batched GEMM, with the query heads that share a key head folded into the GEMM rows. Queries
are split into blocks of `BLOCK_ROWS` rows, and each block only multiplies with the keys it may
see, so the masked upper triangle is mostly never computed; the causal mask is added to each
block's diagonal square only. fwd+bwd per SmolLM2 layer on this 2-core AVX512_BF16 machine: 13.5
vs 26.6 ms for PyTorch's CPU flash kernel (SDPA) at one 512-token sequence, 462 vs 590 ms at 4,096.

The backward pass does not keep the probabilities (B x H x L^2 / 2: ~4.5 GB for SmolLM2's 30
layers at one 4,096-token sequence). As in FlashAttention's backward, it recomputes each query
block's probabilities from the kept queries and keys, then takes the block's share of every
gradient; a block's scores span all the keys it sees, so its softmax is recomputed exactly (the
same bits as the forward's) and no running log-sum-exp is needed. What a layer keeps for backward
is q, k, v: linear in L. The price is one more GEMM per block (QK^T again) in the backward pass.

It is registered with transformers' AttentionInterface and used only for what it was measured on:
causal self-attention (optionally restricted by a boolean mask, as for packed instruction examples
or padding; no KV cache, no dropout) in bf16/fp16. Anything else falls through to SDPA unchanged.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "lorafit_block_causal"
# 128 query rows per block: at 256 the bf16 scores of an 8 x 512 evaluation batch (~19 MB per
# layer) outgrow the cache and attention takes twice as long (33 vs 16 ms per layer measured);
# training (4 x 512, forward + backward) is as fast or slightly faster at 128 (23.0 vs 23.8 ms).
BLOCK_ROWS = 128


def _block_probs(
    q_block: torch.Tensor,
    k_seen: torch.Tensor,
    start: int,
    groups: int,
    allowed: torch.Tensor | None,
    buffer: torch.Tensor,
) -> torch.Tensor:
    """Softmax of one query block's scores against the keys it may see: (B*KVH, G*rows, end),
    computed in place in the front of `buffer` (flat, reused by every block of a call: fresh
    multi-MB tensors per block cost page faults, ~10% of attention time at 4,096 tokens)."""
    batch_kv, group_rows, _ = q_block.shape
    rows, end = group_rows // groups, k_seen.shape[1]
    scores = buffer[: batch_kv * group_rows * end].view(batch_kv, group_rows, end)
    torch.bmm(q_block, k_seen.transpose(1, 2), out=scores)
    if allowed is None:
        # Only the block's own diagonal square holds masked keys: -inf above its diagonal, added in
        # place (a bias as wide as the keys cost a GEMM epilogue and two passes per block).
        diagonal = scores.view(batch_kv, groups, rows, end)[..., start:end]
        diagonal.add_(torch.full((rows, rows), float("-inf"), dtype=scores.dtype, device=scores.device).triu_(1))
    else:
        # The mask is causal already; a finite fill keeps any fully masked row free of NaN.
        batch = allowed.shape[0]
        hidden = ~allowed[:, :, start : start + rows, :end].unsqueeze(2)  # (B, 1, 1, rows, end)
        scores.view(batch, batch_kv // batch, groups, rows, end).masked_fill_(hidden, torch.finfo(scores.dtype).min)
    return torch.ops.aten._softmax.out(scores, -1, False, out=scores)


def _block_buffer(q: torch.Tensor, block_rows: int) -> torch.Tensor:
    """Room for the largest block's scores (the last block sees every key)."""
    batch_kv, groups, length, _ = q.shape
    return torch.empty(batch_kv * groups * min(block_rows, length) * length, dtype=q.dtype, device=q.device)


class _RecomputingAttention(torch.autograd.Function):
    """Grouped causal attention whose backward recomputes probabilities block by block.

    q (B*KVH, G, L, D), already scaled; k, v (B*KVH, L, D); allowed (B, 1, L, L) or None."""

    @staticmethod
    def forward(ctx, q, k, v, allowed, block_rows: int):
        batch_kv, groups, length, dim = q.shape
        out = torch.empty_like(q)
        buffer = _block_buffer(q, block_rows)
        for start in range(0, length, block_rows):
            end = min(start + block_rows, length)
            q_block = q[:, :, start:end].reshape(batch_kv, groups * (end - start), dim)
            probs = _block_probs(q_block, k[:, :end], start, groups, allowed, buffer)
            out[:, :, start:end] = torch.bmm(probs, v[:, :end]).view(batch_kv, groups, end - start, dim)
        ctx.save_for_backward(q, k, v, allowed)
        ctx.block_rows = block_rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, allowed = ctx.saved_tensors
        batch_kv, groups, length, dim = q.shape
        # Key and value gradients gather contributions from every later block: summed in >= fp32.
        acc_dtype = torch.promote_types(k.dtype, torch.float32)
        grad_q = torch.empty_like(q)
        grad_k = torch.zeros(k.shape, dtype=acc_dtype, device=k.device)
        grad_v = torch.zeros(v.shape, dtype=acc_dtype, device=v.device)
        probs_buffer, grad_buffer = _block_buffer(q, ctx.block_rows), _block_buffer(q, ctx.block_rows)
        for start in range(0, length, ctx.block_rows):
            end = min(start + ctx.block_rows, length)
            group_rows = groups * (end - start)
            q_block = q[:, :, start:end].reshape(batch_kv, group_rows, dim)
            grad_block = grad_out[:, :, start:end].reshape(batch_kv, group_rows, dim)
            probs = _block_probs(q_block, k[:, :end], start, groups, allowed, probs_buffer)
            grad_v[:, :end] += torch.bmm(probs.transpose(1, 2), grad_block)
            grad_scores = grad_buffer[: batch_kv * group_rows * end].view(batch_kv, group_rows, end)
            torch.bmm(grad_block, v[:, :end].transpose(1, 2), out=grad_scores)
            # P * (dP - rowsum(dP * P)) in one fused kernel with fp32 sums, as autograd's softmax
            # does; in place (each row's sum is taken before the row is written).
            torch.ops.aten._softmax_backward_data.out(grad_scores, probs, -1, probs.dtype, grad_input=grad_scores)
            grad_q[:, :, start:end] = torch.bmm(grad_scores, k[:, :end]).view(batch_kv, groups, end - start, dim)
            grad_k[:, :end] += torch.bmm(grad_scores.transpose(1, 2), q_block)
        return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype), None, None


def block_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    block_rows: int = BLOCK_ROWS,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention. query (B, H, L, D); key/value (B, KVH, L, D) with H a multiple of KVH
    (grouped-query attention without repeating keys); returns (B, H, L, D). `allowed` (B, 1, L, L),
    True where a query may see a key, further restricts a causal mask (packed examples, padding)."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    # Query heads h*G .. h*G+G-1 share key head h: fold them into the rows of one GEMM.
    q = (query * scaling).reshape(batch * kv_heads, heads // kv_heads, length, dim)
    k = key.reshape(batch * kv_heads, length, dim)
    v = value.reshape(batch * kv_heads, length, dim)
    output = _RecomputingAttention.apply(q, k, v, allowed, block_rows)
    return output.reshape(batch, heads, length, dim)


def lorafit_attention_forward(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
):
    """transformers attention interface: (B, H, L, D) inputs -> ((B, L, H, D) output, None)."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    length = query.shape[2]
    # A boolean (B, 1, L, L) mask is what transformers builds for packed examples (restarting positions).
    mask_fits = attention_mask is None or (
        attention_mask.dtype == torch.bool
        and attention_mask.dim() == 4
        and attention_mask.shape[1] == 1
        and tuple(attention_mask.shape[2:]) == (length, length)
    )
    fits = (
        mask_fits
        and causal
        and dropout == 0.0
        and length > 1
        and key.shape[2] == length
        and query.dtype in (torch.bfloat16, torch.float16)
        and query.shape[1] % key.shape[1] == 0
        and kwargs.get("softcap") is None
        and kwargs.get("position_bias") is None
        and not kwargs.get("output_attentions", False)
    )
    if not fits:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    output = block_causal_attention(query, key, value, scale, allowed=attention_mask)
    return output.transpose(1, 2).contiguous(), None


def register() -> str:
    """Make NAME usable as a transformers attn_implementation (masks built as for SDPA)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, lorafit_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def use_block_causal_attention(model: torch.nn.Module) -> bool:
    """Switch a transformers model to block-causal attention; False where it does not apply."""
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:
        return False
    try:
        setter(register())
    except (ValueError, TypeError):
        return False
    return True


def use_cuda_attention(model: torch.nn.Module, half_precision: bool) -> str:
    """On CUDA: FlashAttention 2 when the flash_attn package is installed and the run computes in
    bf16/fp16, else PyTorch SDPA (its flash / memory-efficient kernels); returns the one in use."""
    import importlib.util

    setter = getattr(model, "set_attn_implementation", None)
    if half_precision and setter is not None and importlib.util.find_spec("flash_attn") is not None:
        try:
            setter("flash_attention_2")
            return "flash_attention_2"
        except (ValueError, ImportError):  # a flash_attn build that does not fit this GPU or torch
            pass
    return "sdpa"  # how load_causal_lm loads every model
