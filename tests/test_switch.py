"""Several adapters on one base: switching without reloading, weighted combinations, `lorafit chat`."""

import json

import pytest
import torch
from test_cli import invoke, make_corpus, write_config

from lorafit.adapters.switch import AdapterSession
from lorafit.errors import UsageError

IDS = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("switch")
    config = write_config(root, tiny_model_dir, make_corpus(root / "docs"))
    runs = {}
    for name, lr in (("law", "2e-2"), ("med", "1e-2")):
        args = ["train", str(config), "--out", str(root / name), "--set", f"train.lr={lr}"]
        args += ["--set", "eval.report=false", "--set", "eval.general=[]"]
        if name == "med":  # a different rank: 'cat' combines adapters of any ranks
            args += ["--set", "lora.r=2"]
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        runs[name] = root / name
    return runs


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def test_switching_adapters_needs_no_reload_and_matches_each_alone(adapters, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    session = AdapterSession({name: str(path) for name, path in adapters.items()}, precision="fp32")
    model = session.model
    seen = {}
    for name in ("law", "med", "base", "law"):
        session.use(name)
        assert session.model is model and session.active == name
        seen.setdefault(name, logits(session.model))
        torch.testing.assert_close(logits(session.model), seen[name])  # switching back restores it exactly
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.testing.assert_close(seen["base"], logits(base))
    alone = PeftModel.from_pretrained(base, str(adapters["med"] / "adapter"))
    torch.testing.assert_close(seen["med"], logits(alone))
    assert (seen["law"] - seen["med"]).abs().max() > 1e-3
    with pytest.raises(UsageError, match="No adapter named 'tax'"):
        session.use("tax")


def test_cat_combination_is_the_weighted_sum_and_saves_as_an_adapter(adapters, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    session = AdapterSession({name: str(path) for name, path in adapters.items()}, precision="fp32")
    session.combine("mix", {"law": 0.7, "med": -0.3})
    layer = session.model.base_model.model.model.layers[0].self_attn.q_proj
    expected = 0.7 * layer.get_delta_weight("law") - 0.3 * layer.get_delta_weight("med")
    torch.testing.assert_close(layer.get_delta_weight("mix"), expected, atol=1e-6, rtol=1e-5)
    session.use("mix")
    mixed = logits(session.model)
    saved = session.save("mix", tmp_path / "mix")
    record = json.loads((saved / "lorafit.json").read_text())
    assert record["combined_from"]["weights"] == {"law": 0.7, "med": -0.3}
    # A standard PEFT folder: plain PEFT loads it and computes the same model.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(base, str(saved))), mixed, atol=1e-5, rtol=1e-5)
    with pytest.raises(UsageError, match="Cannot combine 'tax'"):
        session.combine("bad", {"tax": 1.0})


def test_chat_switches_mixes_and_saves(adapters, tmp_path):
    script = "\n".join(
        [
            "Python lists",
            "/use med",
            "Python lists",
            "/list",
            "/use nope",
            "/mix both law=0.5 med=0.5",
            "/use both",
            "Python lists",
            f"/save both {tmp_path / 'both'}",
            "/quit",
        ]
    )
    args = ["chat", "--adapter", str(adapters["law"]), "--adapter", f"med={adapters['med']}", "--precision", "fp32"]
    result = CliRunnerWithInput(script).invoke(args)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "law:" in out and "med:" in out and "both:" in out
    assert "No adapter named 'nope'" in out  # an error inside the chat does not end it
    assert (tmp_path / "both" / "adapter_model.safetensors").is_file()


class CliRunnerWithInput:
    def __init__(self, text: str):
        self.text = text + "\n"

    def invoke(self, args):
        from typer.testing import CliRunner

        from lorafit.cli import app

        return CliRunner().invoke(app, args, input=self.text, terminal_width=200)


def test_combine_command_checks_its_weights(adapters, tmp_path):
    args = [
        "combine",
        "--adapter",
        str(adapters["law"]),
        "--adapter",
        str(adapters["med"]),
        "--out",
        str(tmp_path / "c"),
    ]
    wrong = invoke(*args, "--weights", "0.5")
    assert wrong.exit_code == 2 and "one per --adapter" in wrong.output
    done = invoke(*args, "--weights", "0.5,0.5")
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["peft_type"] == "LORA"
