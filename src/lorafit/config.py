"""The run configuration: typed and validated in one place (reading it from YAML, with `--set`
overrides: `lorafit.config_files`).

Every field carries a description; `lorafit train --help` and `configs/full.yaml` are generated
from, or checked against, these descriptions so the documentation cannot drift from the code.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Record fields whose names `data.fields` may change (the defaults are the names themselves).
RECORD_FIELDS = (
    "instruction",
    "input",
    "output",
    "system",
    "messages",
    "conversations",
    "role",
    "content",
    "from",
    "value",
    "choices",
    "answer",
)


# Regular-expression characters: a target_modules string holding one is a pattern, not a list of names.
_REGEX_CHARS = set(".*+?[](){}|^$\\")


def is_module_pattern(targets: list[str] | str) -> bool:
    """True for a lora.target_modules regular expression (matched against full module names)."""
    return isinstance(targets, str) and targets != "all-linear" and bool(_REGEX_CHARS & set(targets))


# data.replay_share: 'auto' for instruction data (with self-distillation, the recipe of
# bench/domain_gain.py that gained on both test sets).
AUTO_REPLAY_SHARE = 0.2

LORA_INITS = ("default", "gaussian", "pissa", "olora", "loftq", "eva")


def one_or_many(value: Any) -> Any:
    """A list-valued key also takes one value (or nothing): `train: docs/` means `train: [docs/]`."""
    if value is None or value == "":
        return []
    return [value] if isinstance(value, (str, Path)) else value


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, assignments are validated, and no
    number may be NaN or infinite (`lora.alpha: .inf` would train into NaN)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


ROPE_SCALING_TYPES = ("linear", "dynamic", "yarn", "llama3")
# Keys each rope scaling type may carry besides `type` and `factor` (transformers' names).
ROPE_SCALING_KEYS = {
    "linear": (),
    "dynamic": (),
    "yarn": ("original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor"),
    "llama3": ("original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
}


def check_rope_scaling(scaling: dict | None) -> dict | None:
    """model.rope_scaling as written ({type, factor, ...}), checked and normalised; None stays None."""
    if scaling is None:
        return None
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind not in ROPE_SCALING_TYPES:
        raise ValueError(f"type must be one of {', '.join(ROPE_SCALING_TYPES)} (got {kind!r})")
    factor = scaling.get("factor")
    if not isinstance(factor, int | float) or isinstance(factor, bool) or factor <= 1.0:
        raise ValueError(f"factor must be a number above 1 (got {factor!r}): the context grows by this factor")
    allowed = ROPE_SCALING_KEYS[kind]
    unknown = sorted(set(scaling) - {"type", "rope_type", "factor", *allowed})
    if unknown:
        raise ValueError(f"{kind} scaling takes no {unknown[0]!r} (it takes: {', '.join(('factor', *allowed))})")
    return {"type": kind, "factor": float(factor), **{key: scaling[key] for key in allowed if key in scaling}}


class ModelSection(Section):
    base: str = Field(
        "",
        description="Base model: empty for the embedded SmolLM2-135M-Instruct, a local HF folder, "
        "a .gguf file, or a hub id (needs network).",
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none",
        description="Load the frozen base quantized with bitsandbytes (CUDA GPU only): '4bit' NF4 with double "
        "quantization (QLoRA), or '8bit'.",
    )
    rope_scaling: dict[str, Any] | None = Field(
        None,
        description="Extend the base's trained context for a longer train.seq_len: {type: linear|dynamic|yarn|llama3, "
        "factor: F} (context x F; yarn and llama3 take transformers' optional keys). Recorded with the adapter and "
        "applied wherever it is loaded, merged or exported. A base whose rope is scaled already keeps its own.",
    )

    @field_validator("rope_scaling")
    @classmethod
    def _rope_scaling(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return check_rope_scaling(value)


class DataSection(Section):
    def replay_share_for(self, instruction_data: bool) -> float:
        """data.replay_share as it applies: 'auto' is AUTO_REPLAY_SHARE for instruction data."""
        if self.replay_share == "auto":
            return AUTO_REPLAY_SHARE if instruction_data else 0.0
        return self.replay_share

    def self_distills(self, instruction_data: bool) -> bool:
        """data.self_distill as it applies: 'auto' is on for instruction data."""
        return self.self_distill is True or (self.self_distill == "auto" and instruction_data)

    train: list[str] = Field(
        default_factory=list,
        description="Training data: prepared JSONL files/folders, or raw documents "
        "(.html/.htm/.md/.txt/.pdf/.jsonl) that are prepared on the fly.",
    )
    valid: list[str] = Field(
        default_factory=list,
        description="Validation data, same kinds as data.train; empty = a document-level split of data.train.",
    )
    text_field: str = Field("text", description="Field holding the text in JSONL records.")
    valid_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Share of documents held out when data.valid is empty.")
    min_chars: int = Field(200, ge=0, description="Drop documents shorter than this many characters.")
    near_dup_threshold: float = Field(
        0.8, gt=0.0, le=1.0, description="Jaccard similarity above which near-duplicates are dropped."
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="JSONL evaluation sets: training documents sharing a long n-gram with them are dropped.",
    )
    exclude_ngram: int = Field(13, ge=4, description="n-gram length (in words) for decontamination.")
    workers: int = Field(
        0,
        ge=0,
        description="Processes that read, clean and tokenize raw documents (0: one per available core); "
        "the result is the same for any number.",
    )
    format: Literal["auto", "text", "alpaca", "chat", "sharegpt"] = Field(
        "auto",
        description="JSONL/JSON record format: 'auto' detects it per file (messages -> chat, conversations -> "
        "sharegpt, instruction+output -> alpaca, else text); raw documents are always text.",
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Renamed record fields, e.g. {output: response}; keys: " + ", ".join(RECORD_FIELDS) + ".",
    )
    chat_template: str = Field(
        "auto",
        description="Prompt rendering for instruction data: 'auto' (the tokenizer's template, else lorafit's "
        "default), 'model' (the tokenizer's; an error if it has none), 'default', a .jinja file, or a Jinja string.",
    )
    train_turns: Literal["all", "last"] = Field(
        "all", description="Assistant turns trained in multi-turn chats: every one, or only the last."
    )
    instruct_share: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="With both text and instruction data: share of training blocks drawn from instructions "
        "(0 = their natural share).",
    )

    self_distill: bool | Literal["auto"] = Field(
        "auto",
        description="Self-distillation: before training, the base model answers each training question itself, "
        "shown the reference answer, and the adapter learns that answer (facts in the model's own register); "
        "unusable rewrites keep the reference. Cached under $LORAFIT_HOME/base-answers. 'auto' = on for "
        "instruction data (with replay, the recipe of bench/domain_gain.py that transfers), false = train on the "
        "references.",
    )
    distill_max_new_tokens: int = Field(
        256, ge=1, description="Longest self-distilled answer in tokens (a longer one keeps the reference)."
    )
    replay_share: Annotated[float, Field(ge=0.0, lt=1.0)] | Literal["auto"] = Field(
        "auto",
        description="Share of training blocks holding the base model's own answers to general prompts "
        "(data.replay_prompts), generated once and cached: keeps its register on what the domain data never asks. "
        f"'auto' = {AUTO_REPLAY_SHARE} for instruction data, 0 for text; 0 = off.",
    )
    replay_prompts: str = Field(
        "builtin",
        description="Prompts for data.replay_share: 'builtin' (120 general questions shipped with lorafit), or a "
        "JSONL file of records with 'instruction' (or 'prompt'), or a .txt file with one prompt per line.",
    )
    replay_max_new_tokens: int = Field(256, ge=1, description="Longest replayed answer in tokens.")

    @field_validator("train", "valid", "exclude", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return one_or_many(value)

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if key not in RECORD_FIELDS:
                hint = difflib.get_close_matches(key, RECORD_FIELDS, n=1)
                raise ValueError(
                    f"unknown record field '{key}'"
                    + (f"; did you mean '{hint[0]}'?" if hint else f"; use one of {', '.join(RECORD_FIELDS)}")
                )
        return value


class LoraSection(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Dropout on the LoRA input (0 skips a mask per adapted layer: ~25% faster on CPU).",
    )
    target_modules: list[str] | str = Field(
        "all-linear",
        description="Module names to adapt (e.g. [q_proj, v_proj]), a regular expression matched against full "
        "module names, or 'all-linear'.",
    )
    use_rslora: bool = Field(
        True,
        description="Rank-stabilised LoRA: scale the update by alpha/sqrt(r), not alpha/r (the best of "
        "bench/lora_variants.py at the same cost).",
    )
    use_dora: bool = Field(
        False, description="DoRA: a trained magnitude per output row on top of the LoRA direction (slower)."
    )
    init: str = Field(
        "default",
        description="Adapter initialisation: 'default' (A random, B zero), 'gaussian', 'pissa' (principal singular "
        "vectors; the base keeps the residual), 'pissa_niter_N' (fast randomised SVD), 'olora', 'loftq' (quantized "
        "base only), 'eva' (data-driven, from training batches).",
    )
    rank_pattern: dict[str, int] = Field(
        default_factory=dict,
        description="Ranks for particular layers or modules, by name or regular expression, e.g. "
        "{'layers\\.0\\.': 32, down_proj: 8}.",
    )
    alpha_pattern: dict[str, float] = Field(
        default_factory=dict, description="Alphas for particular layers or modules, like lora.rank_pattern."
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full and saved with the adapter (e.g. [embed_tokens, lm_head] when tokens "
        "are added).",
    )
    bias: Literal["none", "all", "lora_only"] = Field(
        "none", description="Biases trained: none, all, or those of adapted layers."
    )
    init_from: str = Field(
        "",
        description="A trained adapter (run folder or PEFT adapter folder) whose weights start this run's LoRA: "
        "instruction tuning after continued pretraining, or more training of an adapter. Same r, targets and base.",
    )
    plus_ratio: float = Field(
        0.0,
        ge=0.0,
        description="LoRA+: the B matrices learn at train.lr x this ratio (0 = off; the LoRA+ paper uses 16).",
    )

    @field_validator("init")
    @classmethod
    def _init(cls, value: str) -> str:
        if value in LORA_INITS or (value.startswith("pissa_niter_") and value[len("pissa_niter_") :].isdigit()):
            return value
        raise ValueError(f"unknown init {value!r}; use one of {', '.join(LORA_INITS)} or pissa_niter_N")

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, str):
            if value != "all-linear" and not is_module_pattern(value):
                return [part.strip() for part in value.split(",") if part.strip()]
        elif not value:
            raise ValueError("needs at least one module name, or 'all-linear'")
        return value


class TrainSection(Section):
    method: Literal["lora", "full"] = Field(
        "lora", description="'lora' trains an adapter; 'full' fine-tunes every weight (a baseline; saves a model)."
    )
    seq_len: int = Field(512, ge=8, description="Tokens per packed training block.")
    micro_batch_size: int = Field(4, ge=1, description="Blocks per forward/backward pass.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Final learning rate as a share of train.lr.")
    warmup_steps: int = Field(-1, ge=-1, description="Linear warmup steps; -1 = 5% of train.max_steps.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping norm; 0 disables clipping.")
    max_steps: int = Field(100, ge=1, description="Optimizer steps to train (data repeats in epochs as needed).")
    eval_every: int = Field(50, ge=0, description="Validate every N steps (0 = only before and after).")
    eval_max_blocks: int = Field(
        0, ge=0, description="Cap on validation blocks per evaluation (0 = the whole validation set)."
    )
    early_stopping_patience: int = Field(
        0, ge=0, description="Stop after this many evaluations without improvement (0 = off)."
    )
    save_every: int = Field(
        0, ge=0, description="Write a resumable checkpoint every N steps and at the end (0 = none)."
    )
    keep_checkpoints: int = Field(3, ge=1, description="Keep only the newest N checkpoints.")
    seed: int = Field(0, description="Seed for initialisation and data order.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="'auto' picks bf16 where the CPU/GPU computes it fast; on a GPU without bf16 (T4, V100) fp16, "
        "else fp32. 'fp16' autocasts in float16 with a dynamic loss scale (overflow steps skipped and counted).",
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="Recompute activations in the backward pass to save memory (15-25% slower on a CPU). "
        "'auto' turns it on when a micro-batch's activations would take over half the available memory "
        "(long train.seq_len); true/false force it.",
    )
    loss_chunk_tokens: int = Field(
        128, ge=16, description="Tokens per chunk of the fused output-layer loss (bounds logits memory)."
    )
    log_every: int = Field(1, ge=1, description="Write a metrics line every N optimizer steps.")
    monitor_every: int = Field(
        10,
        ge=0,
        description="Every N steps, per LoRA module: the norm of its weight change s*B*A and of the gradients of A "
        "and B, by layer and module type into metrics.jsonl (event lora_norms) and the trackers, with warnings "
        "for modules that do not learn or explode (0 = off).",
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=list,
        description="Trackers that also receive every metrics.jsonl scalar, the config, the summary and the "
        "report's plots, through accelerate (each needs its extra: pip install 'lorafit[tensorboard]'). "
        "TensorBoard writes RUN/tensorboard; W&B and MLflow follow their environment (WANDB_MODE, "
        "MLFLOW_TRACKING_URI; without it, a store in RUN/mlruns).",
    )
    tracker_project: str = Field(
        "lorafit", min_length=1, description="The W&B / trackio project and the MLflow experiment of train.report_to."
    )
    max_bad_steps: int = Field(
        3, ge=1, description="Non-finite steps in a row (each skipped) before rolling back to the last checkpoint."
    )
    rollback_lr_factor: float = Field(0.5, gt=0.0, le=1.0, description="Learning-rate factor after each rollback.")
    max_rollbacks: int = Field(2, ge=0, description="Rollbacks before stopping with a diagnosis.")
    spike_factor: float = Field(
        2.5, ge=0.0, description="Warn when a step's loss exceeds this x the running median (0 = off)."
    )
    neftune_alpha: float = Field(
        0.0,
        ge=0.0,
        description="NEFTune: uniform noise of scale alpha / sqrt(tokens x width) on the input embeddings while "
        "training (0 = off; the paper uses 5).",
    )
    early_stopping_metric: Literal["valid_loss", "rouge_l", "token_f1", "exact_match", "bleu", "mc_accuracy"] = Field(
        "valid_loss",
        description="What chooses the best weights (kept at the end) and early stopping, every train.eval_every "
        "steps: the validation loss, or a task metric on eval.tasks (the mean over its files, each scored on its "
        "first train.early_stopping_examples records).",
    )
    early_stopping_examples: int = Field(
        32, ge=1, description="Records of each eval.tasks file scored at every check of a task early-stopping metric."
    )


class EvalSection(Section):
    prompts: list[str] = Field(
        default_factory=list,
        description="Prompts for the side-by-side generations; empty = the opening of a validation document.",
    )
    max_new_tokens: int = Field(48, ge=1, description="Tokens generated per prompt (greedy).")
    tasks: list[str] = Field(
        default_factory=list,
        description="Instruction/QA test files (alpaca, chat or ShareGPT JSONL) scored after training, base vs "
        "adapter: exact match, token F1, ROUGE-L, BLEU, and multiple-choice accuracy for records with choices; "
        "each file also on its own: the first is the training set's own test set, the others transfer sets.",
    )
    general: list[str] = Field(
        default_factory=lambda: ["builtin"],
        description="General-text files (JSONL 'text' records or documents) whose perplexity before and after "
        "training measures forgetting; 'builtin' = a small general-English sample shipped with lorafit, [] = skip.",
    )
    report: bool = Field(
        True, description="Write report.json, report.md and report.html (plots included) into the run folder."
    )
    task_max_new_tokens: int = Field(128, ge=1, description="Tokens generated per task answer (greedy).")
    task_max_examples: int = Field(
        0, ge=0, description="Score only the first N task records of each eval.tasks file (0 = all)."
    )
    batch_size: int = Field(
        32,
        ge=1,
        description="Answers decoded together (continuous batching) for task answers and side-by-side generations.",
    )

    @field_validator("prompts", "tasks", "general", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return one_or_many(value)


class RunConfig(Section):
    out: str = Field("runs/latest", description="Run folder (overridden by --out).")
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)

    @model_validator(mode="after")
    def _needs_data(self) -> RunConfig:
        if not self.data.train:
            raise ValueError("data.train is empty: name the training documents or prepared JSONL files")
        return self

    @model_validator(mode="after")
    def _compatible(self) -> RunConfig:
        """Combinations that cannot work, refused before any work with the fields named."""
        quantization, lora = self.model.quantization, self.lora
        if lora.init == "loftq" and quantization != "4bit":
            raise ValueError(
                f"lora.init: loftq initialises LoRA against a 4-bit base; set model.quantization: 4bit "
                f"(now {quantization}) or choose another lora.init"
            )
        if self.train.method == "full":
            if quantization != "none":
                raise ValueError(
                    "train.method: full trains every weight, which a quantized base cannot do; "
                    "set model.quantization: none or train.method: lora"
                )
            if lora.plus_ratio:
                raise ValueError("lora.plus_ratio (LoRA+) applies to LoRA's B matrices; train.method is full")
        if self.train.early_stopping_metric != "valid_loss" and not self.eval.tasks:
            raise ValueError(
                f"train.early_stopping_metric: {self.train.early_stopping_metric} is measured on eval.tasks, which is "
                "empty; name the test files in eval.tasks or use valid_loss"
            )
        if lora.init_from and (self.train.method == "full" or lora.init != "default"):
            raise ValueError(
                "lora.init_from starts the LoRA from a trained adapter; it needs train.method: lora and "
                f"lora.init: default (now {self.train.method}, {lora.init})"
            )
        if lora.use_dora and lora.init == "eva":
            raise ValueError("lora.use_dora with lora.init: eva is not supported by PEFT; drop one of them")
        return self
