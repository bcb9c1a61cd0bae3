"""The fused output-layer loss equals the plain one, and accumulation equals one big batch."""

import pytest
import torch

from lorafit.compute.loss import IGNORE_INDEX, fused_lm_loss_sum, reference_lm_loss_sum, target_count
from lorafit.compute.objective import CausalLMObjective
from lorafit.config import LoraSection
from lorafit.model.lora import apply_lora


@pytest.mark.parametrize("chunk", [3, 7, 1000])
def test_fused_loss_and_gradients_match_reference(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 40, (3, 11))
    labels[0, 4:7] = IGNORE_INDEX
    fused = fused_lm_loss_sum(hidden, weight, labels, chunk_tokens=chunk)
    (fused * 0.3).backward()
    fused_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    reference = reference_lm_loss_sum(hidden @ weight.T, labels)
    (reference * 0.3).backward()
    assert fused.item() == pytest.approx(reference.item(), rel=1e-10)
    assert torch.allclose(fused_grads[0], hidden.grad, atol=1e-10)
    assert torch.allclose(fused_grads[1], weight.grad, atol=1e-10)


def test_only_target_rows_reach_the_output_layer(monkeypatch):
    """Prompt and padding tokens cost no logits (the head is ~a fifth of a small model's work); an
    all-prompt batch is a zero loss with zero gradients, not NaN."""
    import lorafit.compute.loss as loss_module

    rows_seen = []
    real_linear = loss_module.F.linear
    monkeypatch.setattr(loss_module.F, "linear", lambda h, w: rows_seen.append(h.shape[0]) or real_linear(h, w))
    hidden = torch.randn(2, 9, 8, requires_grad=True)
    weight = torch.randn(20, 8)
    labels = torch.randint(0, 20, (2, 9))
    labels[:, :6] = IGNORE_INDEX  # a prompt of 6 tokens: 2 x 3 targets after the shift
    fused_lm_loss_sum(hidden, weight, labels, chunk_tokens=4).backward()
    assert sum(rows_seen) == target_count(labels) == 6
    assert (hidden.grad[:, :5] == 0).all() and (hidden.grad[:, 5:8] != 0).any()
    hidden.grad = None
    labels[:] = IGNORE_INDEX
    nothing = fused_lm_loss_sum(hidden, weight, labels)
    nothing.backward()
    assert nothing.item() == 0.0 and torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_fused_loss_without_gradients_is_just_the_loss():
    hidden = torch.randn(2, 5, 8)
    weight = torch.randn(20, 8)
    labels = torch.randint(0, 20, (2, 5))
    with torch.no_grad():
        assert fused_lm_loss_sum(hidden, weight, labels).item() == pytest.approx(
            reference_lm_loss_sum(hidden @ weight.T, labels).item(), rel=1e-5
        )


def _lora_objective(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    model = apply_lora(model, LoraSection(r=4, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():  # non-zero B so every LoRA weight gets a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return CausalLMObjective(model, torch.float64, chunk_tokens=5)


def test_objective_matches_transformers_loss(tiny_model_dir):
    objective = _lora_objective(tiny_model_dir)
    batch = torch.randint(0, 300, (2, 12))
    ours = objective(batch, batch) / target_count(batch)
    theirs = objective.model(input_ids=batch, labels=batch).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)  # transformers reduces in fp32


def test_accumulated_micro_batches_equal_one_big_batch(tiny_model_dir):
    """Normalise by the total target tokens of the accumulated batch, not per micro-batch."""
    objective = _lora_objective(tiny_model_dir)
    params = [p for p in objective.parameters() if p.requires_grad]
    batch = torch.randint(0, 300, (4, 12))
    labels = batch.clone()
    labels[0, 2:11] = IGNORE_INDEX  # uneven target counts between micro-batches
    labels[3, 5:] = IGNORE_INDEX

    (objective(batch, labels) / target_count(labels)).backward()
    big = [p.grad.clone() for p in params]
    objective.zero_grad()

    micro = [(batch[i : i + 1], labels[i : i + 1]) for i in range(4)]
    total = sum(target_count(y) for _, y in micro)
    for x, y in micro:
        (objective(x, y) / total).backward()
    for a, p in zip(big, params):
        assert torch.allclose(a, p.grad, atol=1e-12)
