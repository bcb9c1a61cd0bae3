"""Instruction tuning: formats, the one chat-template rendering, answer-only labels, packing without
cross-contamination, bad records, and the end-to-end run with task metrics."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import write_jsonl
from test_cli import invoke

from lorafit.config import DataSection
from lorafit.data.chat_template import (
    DEFAULT_CHAT_TEMPLATE,
    conversation_segments,
    render_prompt,
    resolve_chat_template,
)
from lorafit.data.datasets import load_run_documents, pack_run_documents
from lorafit.data.documents import Problems
from lorafit.data.examples import IGNORE_INDEX, build_examples
from lorafit.data.formats import Conversation, detect_file_format, field_names, read_conversations
from lorafit.data.pack import assign_best_fit, pack_examples
from lorafit.errors import ConfigError, DataError

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

ALPACA = [
    {"instruction": "Add two numbers.", "input": "1 and 2", "output": "def add(a, b): return a + b"},
    {"instruction": "What is a tuple?", "input": "", "output": "An immutable sequence."},
    {"instruction": "Name a mapping type.", "output": "dict"},
]
CHAT = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is a list?"},
            {"role": "assistant", "content": "A mutable sequence."},
            {"role": "user", "content": "And a set?"},
            {"role": "assistant", "content": "An unordered collection."},
        ]
    }
]
SHAREGPT = [
    {
        "conversations": [
            {"from": "human", "value": "What does len do?"},
            {"from": "gpt", "value": "It returns the number of items."},
        ]
    }
]


@pytest.fixture()
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture()
def chatml_tokenizer(tokenizer):
    tokenizer.chat_template = CHATML
    return tokenizer


def read(path: Path, fmt: str, problems: Problems | None = None, **fields) -> list[Conversation]:
    return read_conversations([path], fmt, field_names(fields), problems if problems is not None else Problems())


def test_formats_are_detected_per_file_and_become_the_same_messages(tmp_path):
    files = {
        "alpaca": write_jsonl(tmp_path / "a.jsonl", ALPACA),
        "chat": write_jsonl(tmp_path / "c.jsonl", CHAT),
        "sharegpt": write_jsonl(tmp_path / "s.jsonl", SHAREGPT),
        "text": write_jsonl(tmp_path / "t.jsonl", [{"text": "plain"}]),
    }
    for fmt, path in files.items():
        assert detect_file_format(path, field_names({}), "text") == fmt
    alpaca = read(files["alpaca"], "alpaca")
    assert alpaca[0].messages == [
        {"role": "user", "content": "Add two numbers.\n\n1 and 2"},
        {"role": "assistant", "content": "def add(a, b): return a + b"},
    ]
    assert alpaca[1].messages[0] == {"role": "user", "content": "What is a tuple?"}
    assert alpaca[0].source == f"{files['alpaca']}:1"
    assert read(files["sharegpt"], "sharegpt")[0].messages == [
        {"role": "user", "content": "What does len do?"},
        {"role": "assistant", "content": "It returns the number of items."},
    ]
    assert [m["role"] for m in read(files["chat"], "chat")[0].messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    # A JSON array (alpaca_data.json style) and renamed fields work too.
    renamed = tmp_path / "r.json"
    renamed.write_text(json.dumps([{"prompt": "Hi?", "response": "Hello."}]))
    fields = field_names({"instruction": "prompt", "output": "response"})
    assert detect_file_format(renamed, fields, "text") == "alpaca"
    assert read(renamed, "alpaca", instruction="prompt", output="response")[0].messages[-1]["content"] == "Hello."


def test_bad_records_are_reported_with_file_and_line_and_the_rest_is_used(tmp_path):
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(
        "\n".join(
            [
                json.dumps({"instruction": "Fine.", "output": "Yes."}),
                json.dumps({"instruction": "No answer field."}),
                json.dumps({"instruction": "Empty answer.", "output": "  "}),
                "{not json",
                json.dumps({"instruction": "Also fine.", "output": "Sure."}),
            ]
        )
        + "\n"
    )
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [{"role": "user", "content": "Hi"}]},
            {"messages": [{"role": "wizard", "content": "Hi"}, {"role": "assistant", "content": "x"}]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
        ],
    )
    problems = Problems()
    kept = read(alpaca, "alpaca", problems) + read(chat, "chat", problems)
    assert [c.source for c in kept] == [f"{alpaca}:1", f"{alpaca}:5", f"{chat}:3"]
    messages = {p.where: p.message for p in problems.items}
    assert "missing field 'output'" in messages[f"{alpaca}:2"]
    assert "assistant answer is empty" in messages[f"{alpaca}:3"]
    assert "invalid JSON" in messages[f"{alpaca}:4"]
    assert "ends on a user turn" in messages[f"{chat}:1"]
    assert "unknown role 'wizard'" in messages[f"{chat}:2"]
    assert len(problems.items) == 5


def test_answer_only_labels_with_the_models_template(chatml_tokenizer):
    tokenizer = chatml_tokenizer
    template = resolve_chat_template(tokenizer, "auto")
    assert template.origin == "model"
    conversation = Conversation(messages=CHAT[0]["messages"], source="x")
    examples = build_examples([conversation], tokenizer, template, seq_len=256)
    ids, labels = examples.input_ids[0], examples.labels[0]
    # The tokens fed in are exactly the rendered conversation.
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CHAT[0]["messages"], tokenize=False)
    trained = [tokenizer.decode(ids[start:end]) for start, end in _runs(labels != IGNORE_INDEX)]
    # Both answers, each with the EOS that ends it; the newline after it and every prompt token masked.
    assert trained == ["A mutable sequence.<|im_end|>", "An unordered collection.<|im_end|>"]
    last_only = build_examples([conversation], tokenizer, template, seq_len=256, train_turns="last")
    trained = [tokenizer.decode(ids[s:e]) for s, e in _runs(last_only.labels[0] != IGNORE_INDEX)]
    assert trained == ["An unordered collection.<|im_end|>"]


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, flag in enumerate([*mask.tolist(), False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_default_template_when_the_model_has_none_and_a_clear_error_when_one_is_required(tokenizer):
    assert not tokenizer.chat_template
    template = resolve_chat_template(tokenizer, "auto")
    assert template.origin == "default" and template.text == DEFAULT_CHAT_TEMPLATE
    messages = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    assert render_prompt(tokenizer, template, messages) == "### User:\nQ?\n\n### Assistant:\n"
    segments = conversation_segments(tokenizer, template, messages)
    assert segments == [("### User:\nQ?\n\n### Assistant:\n", False), ("A.<|im_end|>\n\n", True)]
    with pytest.raises(ConfigError, match="has no chat template"):
        resolve_chat_template(tokenizer, "model")
    with pytest.raises(ConfigError, match="neither"):
        resolve_chat_template(tokenizer, "no-such-template")
    with pytest.raises(ConfigError, match="chat template"):
        resolve_chat_template(tokenizer, "{% for m in messages %}{{ m.content }")


def test_template_that_is_not_incremental_is_refused(tokenizer):
    # Renders the last message only: earlier text is not a prefix of later text.
    template = resolve_chat_template(tokenizer, "{{ messages[-1]['content'] }}")
    with pytest.raises(DataError, match="incrementally"):
        conversation_segments(tokenizer, template, CHAT[0]["messages"])


def test_examples_longer_than_seq_len_are_truncated_and_counted(tokenizer):
    template = resolve_chat_template(tokenizer, "default")
    long = Conversation([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "word " * 80}], "long")
    huge_prompt = Conversation([{"role": "user", "content": "Q " * 200}, {"role": "assistant", "content": "A"}], "p")
    short = Conversation([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "short")
    problems = Problems()
    examples = build_examples([long, huge_prompt, short], tokenizer, template, seq_len=40, problems=problems)
    assert examples.stats["truncated_examples"] == 2
    assert examples.stats["dropped_examples_prompt_too_long"] == 1
    assert examples.sources == ["long", "short"]
    assert len(examples.input_ids[0]) == 40
    assert problems.items[0].where == "p" and "train.seq_len=40" in problems.items[0].message


def test_packing_places_whole_examples_and_restarts_positions():
    rng = np.random.default_rng(1)
    lengths = [int(n) for n in rng.integers(3, 30, size=40)]
    ids = [rng.integers(3, 200, size=n) for n in lengths]
    labels = [np.where(np.arange(n) < 2, IGNORE_INDEX, x) for n, x in zip(lengths, ids)]
    packed = pack_examples(ids, labels, seq_len=32, pad_id=0)
    assert sorted(i for block in packed.members for i in block) == list(range(40))
    for row, members in enumerate(packed.members):
        start = 0
        for index in members:
            end = start + lengths[index]
            assert packed.input_ids[row, start:end].tolist() == ids[index].tolist()
            assert packed.labels[row, start:end].tolist() == labels[index].tolist()
            assert packed.position_ids[row, start:end].tolist() == list(range(lengths[index]))
            start = end
        assert (packed.labels[row, start:] == IGNORE_INDEX).all()  # padding is never trained
    # Best fit decreasing wastes little: within one block of the ideal count.
    assert len(packed) <= -(-sum(lengths) // 32) + 1
    assert assign_best_fit([5, 5, 5], 10) == [[0, 1], [2]]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_packed_block_loss_and_gradients_equal_its_examples_run_one_by_one(tiny_model_dir, precision):
    """Attention never crosses an example boundary and positions restart per example."""
    from transformers import AutoModelForCausalLM

    from lorafit.compute.objective import CausalLMObjective
    from lorafit.config import LoraSection
    from lorafit.model.attention import use_block_causal_attention
    from lorafit.model.lora import apply_lora

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype, attn_implementation="sdpa")
    if precision == "bf16":
        assert use_block_causal_attention(model)  # lorafit's masked bf16 kernel, not SDPA
    model = apply_lora(model, LoraSection(r=4, alpha=8, target_modules="all-linear"), under_autocast=False)
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)  # B = 0 at init would hide half the gradients
    objective = CausalLMObjective(model, dtype, chunk_tokens=16)
    rng = np.random.default_rng(0)
    ids = [rng.integers(3, 300, size=n) for n in (9, 14, 5, 3)]
    labels = [np.where(np.arange(len(x)) < 3, IGNORE_INDEX, x) for x in ids]
    packed = pack_examples(ids, labels, seq_len=40, pad_id=2)
    assert len(packed) == 1 and len(packed.members[0]) == 4

    def loss_and_grads(batches):
        model.zero_grad()
        total = 0.0
        for batch in batches:
            loss = objective(**{k: torch.as_tensor(v) for k, v in batch.items()})
            loss.backward()
            total += float(loss.detach())
        return total, {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}

    packed_loss, packed_grads = loss_and_grads(
        [{"input_ids": packed.input_ids, "labels": packed.labels, "position_ids": packed.position_ids}]
    )
    alone_loss, alone_grads = loss_and_grads([{"input_ids": x[None], "labels": y[None]} for x, y in zip(ids, labels)])
    tolerance = 1e-5 if precision == "fp32" else 2e-2
    assert packed_loss == pytest.approx(alone_loss, rel=tolerance)
    for name, grad in alone_grads.items():
        scale = grad.abs().max().clamp(min=1e-8)
        assert float((packed_grads[name] - grad).abs().max() / scale) < tolerance, name
    # Without the restarting positions the examples would see each other: the gradients change.
    _, contaminated = loss_and_grads([{"input_ids": packed.input_ids, "labels": packed.labels}])
    worst = max(
        float((contaminated[n] - g).abs().max() / g.abs().max().clamp(min=1e-8)) for n, g in alone_grads.items()
    )
    assert worst > 5 * tolerance


def test_text_and_instructions_mix_in_one_run_with_a_share(tmp_path, tokenizer):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"d{i}.txt").write_text(f"Document {i} about Python lists and tuples. " * 12)
    write_jsonl(
        tmp_path / "inst.jsonl", ALPACA * 2 + [{"instruction": f"Q{i}?", "output": f"A{i}."} for i in range(30)]
    )
    data = DataSection(train=[str(docs), str(tmp_path / "inst.jsonl")], valid_ratio=0.2, min_chars=50)
    documents = load_run_documents(data, tmp_path / "prepared")
    assert documents.train and documents.train_conversations
    assert documents.stats["instructions"]["exact_duplicates"] == 3
    template = resolve_chat_template(tokenizer, "auto")
    natural = pack_run_documents(documents, tokenizer, 32, template)
    text_blocks = natural.stats["train_blocks"] - natural.stats["instructions"]["train_blocks"]
    mixed = pack_run_documents(documents, tokenizer, 32, template, instruct_share=0.75)
    assert mixed.stats["instructions"]["train_blocks"] == 3 * text_blocks
    # Instruction blocks carry their masks and positions; text blocks stay one stream.
    assert (mixed.train.labels[:text_blocks] == mixed.train.input_ids[:text_blocks]).all()
    assert (mixed.train.labels[text_blocks:] == IGNORE_INDEX).any()
    sources = {natural.sources[m] for block in natural.train.members for m in block}
    assert any(s.endswith(".txt") for s in sources) and any(".jsonl:" in s for s in sources)


def test_instruction_run_end_to_end_with_task_metrics(tmp_path, tiny_model_dir):
    train = write_jsonl(
        tmp_path / "train.jsonl",
        [{"instruction": f"What is item {i}?", "output": f"Item {i} is a number."} for i in range(40)]
        + [{"instruction": "Broken"}],
    )
    test = write_jsonl(
        tmp_path / "test.jsonl",
        [{"instruction": f"What is item {i}?", "output": f"Item {i} is a number."} for i in range(40, 44)]
        + [{"instruction": "Pick the mutable type.", "choices": ["tuple", "list"], "answer": "B"}],
    )
    config = {
        "model": {"base": str(tiny_model_dir)},
        "data": {"train": [str(train)], "valid_ratio": 0.2},
        "lora": {"r": 4, "alpha": 8},
        "train": {"seq_len": 64, "micro_batch_size": 2, "lr": 5e-3, "max_steps": 4, "eval_every": 2},
        "eval": {"tasks": [str(test)], "task_max_new_tokens": 8, "max_new_tokens": 4},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    result = invoke("train", str(path), "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert "missing field 'output'" in result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data_problems"][0]["where"] == f"{train}:41"
    instructions = summary["data"]["instructions"]
    assert instructions["invalid_records"] == 1 and instructions["chat_template"] == "default"
    assert instructions["train_examples"] + instructions["valid_examples"] == 40
    tasks = json.loads((tmp_path / "run" / "tasks.json").read_text())
    for side in ("base", "adapter"):
        metrics = tasks["metrics"][side]
        assert metrics["count"] == 4 and metrics["mc_count"] == 1
        assert {"exact_match", "token_f1", "rouge_l", "bleu", "mc_accuracy"} <= set(metrics)
    assert tasks["answers"][0]["reference"] == "Item 40 is a number."
    assert summary["tasks"] == tasks["metrics"]
    # The generations were prompted through the same template the model trained with.
    assert summary["generations"][0]["rendered_prompt"].startswith("### User:\n")
    assert summary["generations"][0]["prompt"].startswith("What is item")
    adapter_meta = json.loads((tmp_path / "run" / "adapter" / "lorafit.json").read_text())
    assert adapter_meta["chat_template"]["text"] == DEFAULT_CHAT_TEMPLATE


def test_tasks_need_reference_answers(tmp_path, tiny_model_dir):
    text = write_jsonl(tmp_path / "plain.jsonl", [{"text": "Python lists are mutable sequences. " * 5}] * 4)
    from lorafit.evaluation.tasks import load_task_records

    with pytest.raises(DataError, match="needs instruction records"):
        load_task_records([str(text)], DataSection(train=[str(text)]), Problems())


def test_instruction_records_get_the_near_duplicate_pass_documents_get(tmp_path):
    sentence = "Item {} of a list is found by index {}, and slicing copies a range of items."
    answer = " ".join(sentence.format(i, i) for i in range(8))
    near = answer.replace("index 3,", "position 3,")  # one word of 136 differs
    records = [
        {"instruction": "What is a list?", "output": answer},
        {"instruction": "What is a list?", "output": near},
        {"instruction": "What is a dict?", "output": "A mapping of keys to values, looked up by hashing the key."},
    ]
    data = DataSection(train=[str(write_jsonl(tmp_path / "inst.jsonl", records))], valid_ratio=0.0)
    documents = load_run_documents(data.model_copy(update={"valid": [str(tmp_path / "inst.jsonl")]}), None)
    stats = documents.stats["instructions"]
    assert stats["near_duplicates"] == 1 and stats["exact_duplicates"] == 0
    assert [c.messages[-1]["content"] for c in documents.train_conversations] == [answer, records[2]["output"]]
    strict = load_run_documents(data.model_copy(update={"valid": data.train, "near_dup_threshold": 1.0}), None)
    assert len(strict.train_conversations) == 3  # the threshold is data.near_dup_threshold's
