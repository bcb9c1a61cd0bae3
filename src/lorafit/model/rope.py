"""Rotary position scaling: a base's own (Llama 3.1's `llama3`, a YaRN model's `yarn`) kept as it is,
and `model.rope_scaling`, which extends a base's trained context for longer `train.seq_len`.

A scaling chosen for a run is part of the model the adapter was trained on: lorafit records it (the
run's config in lorafit.json) and applies it wherever that adapter's base is loaded again (eval,
chat, serve, switch), and writes it into a merged model's config.json and an exported GGUF's rope
keys. Types: `linear` (positions divided by the factor), `dynamic` (NTK scaling that grows with the
sequence past the trained context), `yarn` and `llama3` (frequency-dependent), as transformers
computes them.
"""

from __future__ import annotations

import copy
from typing import Any

from lorafit.config import check_rope_scaling
from lorafit.errors import ConfigError

LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}


def rope_settings(config: dict) -> dict:
    """The rope parameters of a config.json of either transformers layout: 4.x keeps `rope_theta`
    (and `rope_scaling`) at the top level, 5.x nests them in `rope_parameters`."""
    nested = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    merged = {**scaling, **nested}
    merged["rope_theta"] = float(nested.get("rope_theta", config.get("rope_theta", 10000.0)))
    merged["rope_type"] = nested.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return merged


def trained_context(config: dict) -> int:
    """The context a base was trained at: its original length when its rope is scaled already."""
    rope = rope_settings(config)
    original = rope.get("original_max_position_embeddings") or config.get("original_max_position_embeddings")
    return int(original or config["max_position_embeddings"])


def context_limit(config: dict) -> int:
    """The longest sequence a config.json's model is meant for (dynamic NTK: trained x factor)."""
    rope = rope_settings(config)
    if rope["rope_type"] == "dynamic":
        return int(config["max_position_embeddings"] * rope.get("factor", 1.0))
    return int(config["max_position_embeddings"])


def with_rope_scaling(config: dict, scaling: dict | None) -> dict:
    """A copy of a config.json (either transformers layout) with `scaling` (checked) applied; the
    same config when `scaling` is None. A base whose rope is scaled already is not scaled twice."""
    if scaling is None:
        return config
    scaling = check_rope_scaling(scaling)
    own = rope_settings(config)
    if own["rope_type"] != "default":
        raise ConfigError(
            f"model.rope_scaling: the base scales its rope already ({own['rope_type']}, factor {own.get('factor')}) "
            "and is meant for its max_position_embeddings; remove model.rope_scaling."
        )
    out = copy.deepcopy(config)
    kind, factor = scaling["type"], scaling["factor"]
    original = int(config["max_position_embeddings"])
    params: dict[str, Any] = {"rope_type": kind, "factor": factor}
    if kind == "llama3":
        params |= LLAMA3_DEFAULTS
    if kind in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = original
    params |= {k: v for k, v in scaling.items() if k not in ("type", "factor")}
    if "rope_parameters" in out or "rope_theta" not in out:  # transformers 5.x layout
        out["rope_parameters"] = {**(out.get("rope_parameters") or {}), **params}
        out.pop("rope_scaling", None)
    else:
        out["rope_scaling"] = params
    # Dynamic NTK scales past max_position_embeddings itself, so that stays the trained length.
    if kind != "dynamic":
        out["max_position_embeddings"] = int(round(original * factor))
    return out


def check_context(seq_len: int, config: dict, scaling: dict | None, setting: str = "train.seq_len") -> None:
    """Refuse a sequence longer than the model is meant for, naming the factor that would extend it."""
    limit = context_limit(with_rope_scaling(config, scaling))
    if seq_len <= limit:
        return
    trained = trained_context(config)
    needed = seq_len / trained
    factor = f"{needed:g}" if needed == int(needed) else f"{needed:.2f}"
    if scaling is None and rope_settings(config)["rope_type"] == "default":
        raise ConfigError(
            f"{setting}={seq_len} exceeds the base's trained context of {trained:,} tokens; lower {setting}, or "
            f"extend the context with model.rope_scaling: {{type: yarn, factor: {factor}}} "
            f"(factor = {seq_len:,} / {trained:,}; linear, dynamic and llama3 work too)."
        )
    if scaling is None:
        raise ConfigError(f"{setting}={seq_len} exceeds the model's context of {limit:,} tokens; lower {setting}.")
    raise ConfigError(
        f"{setting}={seq_len} exceeds the {limit:,} tokens model.rope_scaling's factor {scaling['factor']:g} "
        f"extends the trained {trained:,} to; raise the factor to at least {factor}, or lower {setting}."
    )
