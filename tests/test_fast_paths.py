"""The CPU fast paths (block-causal attention, int16-mask dropout) compute what they replace."""

import math

import pytest
import torch
import torch.nn.functional as F

from lorafit.model.attention import NAME, block_causal_attention, use_block_causal_attention
from lorafit.model.dropout import Int16MaskDropout, use_int16_mask_dropout


@pytest.mark.parametrize(("length", "heads", "kv_heads"), [(512, 9, 3), (300, 4, 4), (37, 6, 2), (5, 2, 1)])
def test_block_causal_attention_matches_sdpa_values_and_gradients(length, heads, kv_heads):
    torch.manual_seed(0)
    shape_q, shape_kv = (2, heads, length, 16), (2, kv_heads, length, 16)
    q, k, v = (torch.randn(s, dtype=torch.float64, requires_grad=True) for s in (shape_q, shape_kv, shape_kv))
    grad_out = torch.randn(shape_q, dtype=torch.float64)
    ours = block_causal_attention(q, k, v, scaling=16**-0.5, block_rows=64)
    ours.backward(grad_out)
    ours_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    reference.backward(grad_out)
    assert torch.allclose(ours, reference, atol=1e-10)
    for mine, theirs in zip(ours_grads, (q.grad, k.grad, v.grad)):
        assert torch.allclose(mine, theirs, atol=1e-10)


def _packed_mask(length: int, starts: list[int]) -> torch.Tensor:
    """Block-causal: a query sees earlier keys of its own document only."""
    document = torch.zeros(length, dtype=torch.long)
    for start in starts:
        document[start:] += 1
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return causal & (document[:, None] == document[None, :])


def _padded_mask(length: int, real: int, left: bool) -> torch.Tensor:
    """Causal with padding keys hidden (left padding: the first length - real; right: the last)."""
    keys = torch.zeros(length, dtype=torch.bool)
    if left:
        keys[length - real :] = True
    else:
        keys[:real] = True
    return torch.ones(length, length, dtype=torch.bool).tril() & keys[None, :]


@pytest.mark.parametrize("kind", ["packed", "left_padded", "right_padded"])
def test_masked_block_causal_attention_matches_sdpa_in_float64(kind):
    """Values and gradients, through the recomputing backward, for every query that sees a key."""
    torch.manual_seed(1)
    length, heads, kv_heads, dim = 200, 6, 2, 16
    if kind == "packed":
        masks = [_packed_mask(length, [0, 37, 130]), _packed_mask(length, [0, 64, 65, 199])]
    else:
        masks = [_padded_mask(length, real, left=kind == "left_padded") for real in (200, 123)]
    allowed = torch.stack(masks)[:, None]  # (B, 1, L, L)
    shape_q, shape_kv = (2, heads, length, dim), (2, kv_heads, length, dim)
    q, k, v = (torch.randn(s, dtype=torch.float64, requires_grad=True) for s in (shape_q, shape_kv, shape_kv))
    grad_out = torch.randn(shape_q, dtype=torch.float64)
    seeing = allowed.any(-1, keepdim=True)  # (B, 1, L, 1): rows with at least one key
    grad_out = grad_out * seeing  # fully hidden rows (left padding) are not compared
    ours = block_causal_attention(q, k, v, scaling=dim**-0.5, block_rows=48, allowed=allowed)
    ours.backward(grad_out)
    ours_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    (reference * seeing).backward(grad_out)
    assert torch.allclose(ours * seeing, torch.nan_to_num(reference) * seeing, atol=1e-10)
    for mine, theirs in zip(ours_grads, (q.grad, k.grad, v.grad)):
        assert torch.allclose(mine, torch.nan_to_num(theirs), atol=1e-10)


def _bytes_kept_for_backward(length: int, fn) -> int:
    """Bytes of every tensor autograd keeps for one attention call's backward pass."""
    torch.manual_seed(0)
    q = torch.randn(1, 9, length, 64, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 3, length, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    kept: dict[int, int] = {}

    def pack(tensor):
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(q, k, v, 0.125).sum().backward()
    return sum(kept.values())


def test_block_causal_attention_keeps_memory_linear_in_length():
    """What a layer keeps for backward grows 4x from 512 to 2,048 tokens, not 16x as the probabilities
    (B x H x L^2) would: this is what lets a 8,192-token sequence train in a few GB."""
    ours = [_bytes_kept_for_backward(length, block_causal_attention) for length in (512, 2048)]
    assert ours[1] / ours[0] < 4.5
    assert ours[1] <= 4 * 9 * 2048 * 64 * 2  # q, k, v (and q's scaled copy): no L x L tensor

    def stored_probabilities(q, k, v, scaling):  # the plain formulation, for contrast
        scores = torch.matmul(q * scaling, k.repeat_interleave(3, dim=1).transpose(-1, -2))
        causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril()
        return torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v.repeat_interleave(3, dim=1)

    plain = [_bytes_kept_for_backward(length, stored_probabilities) for length in (512, 2048)]
    assert plain[1] / plain[0] > 12


def test_model_with_block_causal_attention_matches_sdpa(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        reference = model(input_ids=ids).logits.float()
        assert use_block_causal_attention(model) and model.config._attn_implementation == NAME
        ours = model(input_ids=ids).logits.float()
        # A padding mask or a KV cache is not for the fast path: SDPA handles it, unchanged.
        mask = torch.ones_like(ids)
        mask[0, :5] = 0
        padded = model(input_ids=ids, attention_mask=mask).logits.float()
        generated = model.generate(ids[:1, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert (ours - reference).abs().max() < 0.05 * reference.abs().max()
    assert padded.shape == reference.shape and generated.shape == (1, 12)


def test_int16_mask_dropout_rate_scale_and_gradient():
    torch.manual_seed(0)
    dropout = Int16MaskDropout(0.1)
    assert dropout.p == pytest.approx(0.1, abs=1 / 32768)
    x = torch.ones(1000, 1000, requires_grad=True)
    y = dropout(x)
    dropped = (y == 0).float().mean().item()
    assert dropped == pytest.approx(0.1, abs=0.005)
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)  # inverted scaling keeps the expectation
    y.sum().backward()
    assert torch.equal(x.grad == 0, y == 0)  # no gradient through dropped units
    assert torch.allclose(x.grad[y != 0], torch.tensor(1 / (1 - dropout.p)))
    dropout.eval()
    assert dropout(x) is x


def test_peft_dropouts_are_replaced(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from lorafit.config import LoraSection
    from lorafit.model.lora import apply_lora

    model = apply_lora(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraSection(r=2, dropout=0.05, target_modules=["q_proj", "v_proj"]),
    )
    assert use_int16_mask_dropout(model) == 4  # 2 layers x (q_proj, v_proj)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Int16MaskDropout" in kinds and "Dropout" not in kinds
    assert math.isfinite(model(input_ids=torch.randint(0, 300, (1, 8))).logits.sum().item())
