"""Causal-LM loss that never holds the full logits: the output layer and cross-entropy are fused
and computed chunk by chunk.

With a 49k vocabulary, 4 x 512 tokens of fp32 logits are ~400 MB, and autograd keeps as much again
for log-softmax and its gradient. Here each chunk's logits live only while that chunk is processed;
the gradient with respect to the hidden states (and the output weight, when it is trained) is
computed in the same pass and stored, so the backward pass is a multiplication by grad_output.

The function returns the *sum* of token losses: the training loop divides by the number of target
tokens in the whole accumulated batch, so gradient accumulation equals one big batch (averaging
each micro-batch's mean instead would weight a micro-batch of few targets like a full one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorafit.data.pack import IGNORE_INDEX


class FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens: int, compute_dtype: torch.dtype):
        # Softmax statistics in at least fp32, whatever the matmul dtype.
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            weight_c = weight.detach().to(compute_dtype)
            # needs_input_grad follows requires_grad, not grad mode: fused_lm_loss_sum detaches the
            # inputs under torch.no_grad(), so evaluation computes the loss only.
            grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
            grad_weight = (
                torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if ctx.needs_input_grad[1] else None
            )
            total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
            # Only target rows reach the output layer: padding and (for instruction data) prompt
            # tokens cost no logits, and their hidden states get a zero gradient.
            target_rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
            for start in range(0, target_rows.shape[0], chunk_tokens):
                rows = target_rows[start : start + chunk_tokens]
                h = hidden.detach().index_select(0, rows).to(compute_dtype)
                y = labels.index_select(0, rows)
                # F.linear takes the (vocab, hidden) weight as stored; `h @ weight_c.T` made oneDNN copy
                # the whole transposed bf16 weight for every chunk (a quarter of evaluation time).
                logits = F.linear(h, weight_c).to(acc_dtype)
                target = logits.gather(1, y[:, None]).squeeze(1)
                # One exp pass gives both the log-sum-exp and the softmax (for the gradient).
                row_max = logits.amax(dim=1, keepdim=True)
                probs = logits.sub_(row_max).exp_()
                row_sum = probs.sum(dim=1, keepdim=True)
                lse = (row_max + row_sum.log()).squeeze(1)
                total += (lse - target).sum()
                if grad_hidden is None and grad_weight is None:
                    continue
                probs.div_(row_sum)
                probs[torch.arange(rows.shape[0], device=probs.device), y] -= 1.0
                grad_logits = probs.to(compute_dtype)
                if grad_hidden is not None:
                    grad_hidden.index_copy_(0, rows, (grad_logits @ weight_c).to(hidden.dtype))
                if grad_weight is not None:
                    grad_weight += (grad_logits.T @ h).to(acc_dtype)
        ctx.save_for_backward(*(t for t in (grad_hidden, grad_weight) if t is not None))
        ctx.has = (grad_hidden is not None, grad_weight is not None)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        saved = iter(ctx.saved_tensors)
        # A 0-dim fp32 grad_output keeps the stored gradients' dtype.
        grad_hidden = next(saved) * grad_output if ctx.has[0] else None
        grad_weight = (next(saved) * grad_output).to(ctx.weight_dtype) if ctx.has[1] else None
        return grad_hidden, grad_weight, None, None, None


def fused_lm_loss_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = 128,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Sum of next-token losses. `hidden` (B, L, H) predicts `labels` (B, L) shifted by one."""
    shifted_hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    shifted_labels = labels[:, 1:].reshape(-1)
    dtype = compute_dtype or hidden.dtype
    if not torch.is_grad_enabled():
        # Under no_grad the weights may still require grad (full fine-tuning, a plain transformers
        # model): without this the pass would compute their unused gradients, twice the work.
        shifted_hidden, weight = shifted_hidden.detach(), weight.detach()
    return FusedLinearCrossEntropy.apply(shifted_hidden, weight, shifted_labels, chunk_tokens, dtype)


def reference_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain formulation (full logits), used when the output layer is not a plain Linear."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).to(torch.promote_types(logits.dtype, torch.float32)),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def target_count(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
