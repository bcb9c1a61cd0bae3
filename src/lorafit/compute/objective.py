"""The module the training loop optimises: a causal LM whose forward returns the summed loss.

Wrapping decoder + fused loss in one nn.Module keeps the whole computation inside the module that
accelerate prepares, so DDP/FSDP see every forward.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from lorafit.compute.loss import fused_lm_loss_sum, reference_lm_loss_sum


def causal_lm_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers *ForCausalLM inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class CausalLMObjective(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, compute_dtype: torch.dtype, chunk_tokens: int = 128):
        super().__init__()
        self.model = model
        self.compute_dtype = compute_dtype
        self.chunk_tokens = chunk_tokens

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Summed loss over `labels` != -100. `position_ids` that restart mark packed examples:
        transformers then masks attention block-diagonally, so examples never see each other."""
        causal_lm = causal_lm_of(self.model)
        head = causal_lm.get_output_embeddings()
        decoder = getattr(causal_lm, "model", None)
        inputs = {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}
        if type(head) is torch.nn.Linear and head.bias is None and decoder is not None:
            hidden = decoder(**inputs).last_hidden_state
            if not isinstance(head.weight, DTensor):
                return fused_lm_loss_sum(hidden, head.weight, labels, self.chunk_tokens, self.compute_dtype)
            # An FSDP shard (the output layer not gathered with the decoder's last unit): its own forward.
            return reference_lm_loss_sum(head(hidden), labels)
        # An adapted or unusual output layer: the plain (memory-hungry) formulation.
        return reference_lm_loss_sum(self.model(**inputs).logits, labels)
