from pathlib import Path

import pytest
import yaml

from lorafit.config import RunConfig
from lorafit.config_files import field_reference, load_config
from lorafit.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def flat_keys(raw: dict) -> list[str]:
    """'section.key' for every key of every section, 'key' for top-level settings."""
    return [
        f"{name}.{key}" if isinstance(value, dict) else name
        for name, value in raw.items()
        for key in (value if isinstance(value, dict) else [None])
    ]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_every_shipped_config_loads():
    configs = sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "configs" / "recipes").glob("*.yaml"))
    assert len(configs) > 8, "configs/ and configs/recipes/ should hold example configs"
    for path in configs:
        assert isinstance(load_config(path), RunConfig)


def test_unknown_key_names_field_and_closest_valid_name(tmp_path):
    path = write(tmp_path, "data: {train: [x.jsonl]}\ntrain: {learning_rate: 0.1}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "train.learning_rate" in message and str(path) in message
    assert "Valid keys" in message or "Did you mean" in message


def test_misspelt_key_suggests_the_right_one(tmp_path):
    path = write(tmp_path, "data: {train: [x.jsonl]}\nlora: {rank_r: 8, alpah: 3}\n")
    with pytest.raises(ConfigError, match="Did you mean 'alpha'"):
        load_config(path)


def test_ill_typed_value_names_field_and_value(tmp_path):
    path = write(tmp_path, "data: {train: [x.jsonl]}\ntrain: {max_steps: many}\n")
    with pytest.raises(ConfigError, match=r"train\.max_steps.*'many'"):
        load_config(path)


def test_out_of_range_value_is_refused(tmp_path):
    path = write(tmp_path, "data: {train: [x.jsonl], valid_ratio: 1.5}\n")
    with pytest.raises(ConfigError, match=r"data\.valid_ratio"):
        load_config(path)


def test_yaml_syntax_error_names_line(tmp_path):
    path = write(tmp_path, "data:\n  train: [a, b\n")
    with pytest.raises(ConfigError, match="line"):
        load_config(path)


def test_missing_data_is_explained(tmp_path):
    with pytest.raises(ConfigError, match="data.train"):
        load_config(write(tmp_path, "train: {lr: 0.001}\n"))


def test_overrides_take_dotted_keys_and_yaml_values(tmp_path):
    path = write(tmp_path, "data: {train: [x.jsonl]}\n")
    config = load_config(
        path,
        ["lora.target_modules=[q_proj,v_proj]", "train.lr=1e-4", "train.precision=fp32", "model.base=/models/llama"],
    )
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.train.lr == pytest.approx(1e-4)
    assert config.train.precision == "fp32"
    assert config.model.base == "/models/llama"


@pytest.mark.parametrize("bad", ["train.lr", "=3", "train.lr=[unclosed"])
def test_malformed_override_is_a_clear_error(tmp_path, bad):
    with pytest.raises(ConfigError, match="--set"):
        load_config(write(tmp_path, "data: {train: [x.jsonl]}\n"), [bad])


def test_contract_keys_exist():
    keys = {key for key, _, _ in field_reference()}
    for key in [
        "model.base",
        "data.train",
        "data.valid",
        "lora.r",
        "lora.alpha",
        "lora.dropout",
        "lora.target_modules",
        "train.seq_len",
        "train.micro_batch_size",
        "train.grad_accum",
        "train.lr",
        "train.max_steps",
        "train.eval_every",
        "train.save_every",
        "train.seed",
        "train.precision",
    ]:
        assert key in keys


def test_every_field_is_documented_in_help_and_full_config():
    from typer.testing import CliRunner

    from lorafit.cli import app

    help_text = CliRunner().invoke(app, ["train", "--help"], terminal_width=200).output
    full = (REPO / "configs" / "full.yaml").read_text()
    documented = set(flat_keys(yaml.safe_load(full)))
    for key, _, description in field_reference():
        assert description, f"{key} has no description"
        assert key in " ".join(help_text.split()), f"{key} missing from `lorafit train --help`"
        assert key in documented, f"{key} missing from configs/full.yaml"
