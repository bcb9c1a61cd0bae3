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
