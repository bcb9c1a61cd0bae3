"""`lorafit serve`: the real server in a subprocess on 127.0.0.1, driven by the official `openai`
client and by raw HTTP; served answers proven equal to PEFT + generate and to the merged model."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time

import openai
import pytest
import torch
from serving import CHATML, Server, reference_answer, train_adapter

from lorafit.compute.continuous import ADAPTER_BASE, ContinuousBatcher, Sequence, generate_all
from lorafit.compute.sampling import Sampling

API_KEY, ADMIN_KEY = "test-key", "admin-key"
QUESTION = [{"role": "user", "content": "What does function number 3 return?"}]
OTHER = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a tuple?"}]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("serve")
    library = root / "library"
    library.mkdir()
    return {
        "rslora": train_adapter(root, tiny_model_dir, "rslora", {"use_rslora": True}, template=CHATML),
        "plain": train_adapter(root, tiny_model_dir, "plain", {"use_rslora": False}),
        "dora": train_adapter(root, tiny_model_dir, "dora", {"use_dora": True}),
        "saved": train_adapter(root, tiny_model_dir, "saved", {"modules_to_save": ["lm_head"]}),
        "big": train_adapter(library, tiny_model_dir, "big", {"r": 16, "alpha": 16, "target_modules": "all-linear"}),
    }


@pytest.fixture(scope="module")
def server(adapters, tiny_model_dir, tmp_path_factory):
    args = ["--base", str(tiny_model_dir), "--adapter-dir", str(adapters["big"].parents[1])]
    for name in ("rslora", "plain", "dora", "saved"):
        args += ["--adapter", f"{name}={adapters[name]}"]
    args += ["--api-key", API_KEY, "--admin-key", ADMIN_KEY, "--max-concurrent", "4", "--max-queue", "4"]
    args += ["--max-tokens", "200", "--max-body-bytes", "65536"]
    running = Server(args, tmp_path_factory.mktemp("serve-home"))
    yield running
    running.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def base_id(client) -> str:
    return next(m.id for m in client.models.list().data if m.parent is None)


def ask(client, model, messages=QUESTION, **options):
    options.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=messages, **options)


def test_served_greedy_answers_equal_peft_generate_and_the_merged_model(client, adapters, tiny_model_dir):
    answers = {}
    for name in ("rslora", "plain", "dora", "saved", None):
        for messages in (QUESTION, OTHER):
            served = ask(client, name or base_id(client), messages, max_tokens=24)
            adapter = adapters[name] if name else None
            text, count, finish = reference_answer(tiny_model_dir, adapter, messages, 24)
            assert served.choices[0].message.content == text, name
            assert (served.usage.completion_tokens, served.choices[0].finish_reason) == (count, finish), name
            if name:
                assert reference_answer(tiny_model_dir, adapter, messages, 24, merged=True)[0] == text, name
            answers[(name, messages[-1]["content"])] = text
    # The adapters do change the model, and each its own way.
    assert len({answers[(n, QUESTION[-1]["content"])] for n in ("rslora", "plain", "dora", "saved", None)}) == 5


def test_each_adapter_is_prompted_with_the_template_it_was_trained_with(client, adapters, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    chatml = tokenizer.apply_chat_template(QUESTION, chat_template=CHATML, tokenize=False, add_generation_prompt=True)
    assert ask(client, "rslora", max_tokens=1).usage.prompt_tokens == len(tokenizer(chatml)["input_ids"])
    recorded = json.loads((adapters["plain"] / "lorafit.json").read_text())["chat_template"]["text"]
    default = tokenizer.apply_chat_template(
        QUESTION, chat_template=recorded, tokenize=False, add_generation_prompt=True
    )
    assert ask(client, "plain", max_tokens=1).usage.prompt_tokens == len(tokenizer(default)["input_ids"])


def test_adapters_interleaved_in_one_batch_each_equal_their_solo_answers(adapters, tiny_model_dir):
    from lorafit.serve.host import ModelHost

    host = ModelHost({n: str(adapters[n]) for n in ("rslora", "plain", "dora", "saved")}, str(tiny_model_dir), "fp32")
    prompts = [
        host.tokenizer(f"Python note {i}: def f{i}(x):", add_special_tokens=False)["input_ids"] for i in range(6)
    ]
    names = ["plain", "rslora", "saved", ADAPTER_BASE, "plain", "dora"]

    def sequences():
        return [
            Sequence(p, Sampling(12 + 5 * i), a, host.served[a if a != ADAPTER_BASE else host.base_id].lane)
            for i, (p, a) in enumerate(zip(prompts, names))
        ]

    together = ContinuousBatcher(host.model, host.device, max_batch=8)
    mixed = sequences()
    for sequence in mixed:
        together.add(sequence)
    together.step()
    shared = {s.adapter for s in together.lanes["shared"].rows}
    assert shared == {"plain", "rslora", "saved", ADAPTER_BASE}  # four adapters in one forward
    assert [s.adapter for s in together.lanes["dora"].rows] == ["dora"]  # PEFT cannot mix DoRA
    generate_all(together, [])
    for sequence in mixed:
        solo = generate_all(
            ContinuousBatcher(host.model, host.device, max_batch=1), [sequences()[mixed.index(sequence)]]
        )
        assert sequence.generated == solo[0].generated, sequence.adapter


def test_the_openai_client_chats_streams_completes_and_switches(client, server):
    models = {m.id: m for m in client.models.list().data}
    base = base_id(client)
    assert set(models) == {base, "rslora", "plain", "dora", "saved"}
    assert all(m.parent == base for name, m in models.items() if name != base)
    assert client.models.retrieve("dora").id == "dora"

    whole = ask(client, "plain", max_tokens=24)
    chunks = list(ask(client, "plain", max_tokens=24, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens

    answer = whole.choices[0].message.content
    stop = answer[4:7]
    cut = ask(client, "plain", max_tokens=24, stop=[stop, "never seen"])
    assert cut.choices[0].message.content == answer[: answer.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    cold = ask(client, "plain", max_tokens=24, temperature=1e-9, seed=5)  # sampling this cold is greedy
    assert cold.choices[0].message.content == answer
    short = ask(client, "plain", max_tokens=3)
    assert (short.choices[0].finish_reason, short.usage.completion_tokens) == ("length", 3)

    scored = ask(client, "dora", max_tokens=6, logprobs=True, top_logprobs=3)
    for entry in scored.choices[0].logprobs.content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs))  # greedy picks the top
    completion = client.completions.create(
        model="saved", prompt="Python lists are", max_tokens=5, temperature=0, logprobs=2, echo=True
    )
    choice = completion.choices[0]
    assert choice.text.startswith("Python lists are") and len(choice.logprobs.tokens) == 5
    assert completion.usage.completion_tokens == 5

    sampled = [ask(client, "rslora", max_tokens=8, n=3, seed=11, temperature=1.0) for _ in range(2)]
    texts = [[c.message.content for c in s.choices] for s in sampled]
    assert texts[0] == texts[1] and len(texts[0]) == 3  # the seed replays the same choices
    assert sampled[0].usage == sampled[1].usage

    # Two adapters at once, each answering as it does alone.
    alone = {name: ask(client, name, max_tokens=24).choices[0].message.content for name in ("rslora", "plain")}
    both: dict[str, str] = {}
    threads = [
        threading.Thread(
            target=lambda n=n: both.__setitem__(n, ask(client, n, max_tokens=24).choices[0].message.content)
        )
        for n in ("rslora", "plain", "rslora", "plain")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert both == alone


def test_every_client_mistake_gets_its_4xx_in_the_openai_shape(client, server):
    with pytest.raises(openai.NotFoundError) as raised:
        ask(client, "no-such-adapter")
    assert raised.value.body["code"] == "model_not_found" and raised.value.body["param"] == "model"
    for options, param in (
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"max_tokens": 1000}, "max_tokens"),
        ({"n": 50}, "n"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ):
        with pytest.raises(openai.BadRequestError) as raised:
            ask(client, "plain", **options)
        assert raised.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as raised:
        ask(client, "plain", [{"role": "user", "content": "word " * 400}])
    assert raised.value.body["code"] == "context_length_exceeded" and raised.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="plain", prompt="word " * 400)
    assert raised.value.body["code"] == "context_length_exceeded" and raised.value.body["param"] == "prompt"
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()

    auth = {"authorization": f"Bearer {API_KEY}"}
    chat = "/v1/chat/completions"
    cases = [
        (("POST", chat, {"model": "plain", "messages": QUESTION}, {}), 401),
        (("POST", chat, b"{not json", auth), 400),
        (("POST", chat, b"[1, 2]", auth), 400),
        (("POST", chat, {"model": "plain", "messages": "hello"}, auth), 422),
        (("POST", chat, {"model": "plain", "messages": QUESTION, "max_tokens": "many"}, auth), 422),
        (("POST", chat, {"messages": QUESTION}, auth), 422),
        (("POST", chat, {"model": "plain", "messages": [{"role": "wizard", "content": "x"}]}, auth), 422),
        (("POST", chat, b"x" * 100_000, auth), 413),
        (("POST", "/v1/completions", {"model": "plain", "prompt": "x", "suffix": "y"}, auth), 400),
        (("POST", "/v1/completions", {"model": "plain", "prompt": [5, 10**9]}, auth), 400),
        (("POST", "/v1/completions", {"model": "plain", "prompt": []}, auth), 400),
        (("GET", "/v1/no-such-route", None, auth), 404),
        (("GET", chat, None, auth), 405),
    ]
    for (method, path, body, headers), status in cases:
        got, error, _ = server.request(method, path, body, headers)
        assert got == status, (path, body, error)
        assert set(error["error"]) == {"message", "type", "param", "code"}, error
        assert error["error"]["message"]
    assert server.request("GET", "/v1/models", None, auth)[0] == 200
    assert server.health()["status"] == "ok"


def raw_post(server, path: str, body: dict, declared: int | None = None) -> socket.socket:
    payload = json.dumps(body).encode()
    connection = socket.create_connection(("127.0.0.1", server.port))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Length: {declared or len(payload)}\r\n\r\n"
    )
    connection.sendall(head.encode() + payload)
    return connection


def wait_until_idle(server, seconds: float = 30) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and (server.health()["running"] or server.health()["waiting"]):
        time.sleep(0.05)


def test_cut_bodies_and_clients_that_leave_free_the_server(client, server):
    # ignore_eos: the answers run to max_tokens, so only a cancel can end them early.
    stream = {"model": "plain", "messages": QUESTION, "max_tokens": 200, "n": 4, "stream": True, "ignore_eos": True}
    before = server.health()
    # A body cut mid-way (the client promised 5000 bytes and went away).
    cut = raw_post(server, "/v1/chat/completions", {"model": "plain"}, declared=5000)
    cut.close()
    # A streaming client that reads its first chunk and leaves: its four rows are freed at once.
    leaving = raw_post(server, "/v1/chat/completions", stream)
    received = b""
    while received.count(b"data: ") < 3:  # the role chunk, then tokens: its rows are decoding
        received += leaving.recv(4096)
    leaving.close()
    wait_until_idle(server)
    # A client that never reads its stream blocks nobody.
    silent = raw_post(server, "/v1/chat/completions", {**stream, "n": 1})
    started = time.time()
    assert ask(client, "dora", max_tokens=8).choices[0].message.content
    assert time.time() - started < 60
    silent.close()
    wait_until_idle(server)
    after = server.health()
    assert after["running"] == 0 and after["status"] == "ok"
    assert after["cancelled"] - before["cancelled"] >= 4  # the leaving client's choices, stopped unfinished


def test_a_full_queue_answers_429_with_retry_after(server):
    body = {"model": "plain", "messages": QUESTION, "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    results: list[tuple[int, dict, dict]] = []
    auth = {"authorization": f"Bearer {API_KEY}"}
    threads = [
        threading.Thread(target=lambda: results.append(server.request("POST", "/v1/chat/completions", body, auth)))
        for _ in range(12)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(status for status, _, _ in results)
    assert statuses.count(200) >= 4 and 429 in statuses and set(statuses) == {200, 429}
    for status, error, headers in results:
        if status == 429:
            assert error["error"]["type"] == "rate_limit_error"
            assert {k.lower(): v for k, v in headers.items()}["retry-after"] == "1"


def test_adapters_load_and_unload_at_run_time_with_the_admin_key_only(client, server, adapters, tiny_model_dir):
    library = adapters["big"].parents[1]
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    load = {"name": "big", "path": "big"}
    assert server.request("POST", "/v1/adapters", load)[0] == 401
    assert server.request("POST", "/v1/adapters", load, {"authorization": f"Bearer {API_KEY}"})[0] == 403
    # Outside the adapter folders, by path, by traversal or by a symlink; missing; of another base; a
    # module the base lacks: each a 400, and nothing half-loaded.
    (library / "link").symlink_to(adapters["plain"], target_is_directory=True)
    other_base = shutil.copytree(adapters["plain"], library / "other-base")
    record = json.loads((other_base / "lorafit.json").read_text())
    record["base_model"]["weights_fingerprint"] = "sha256:" + "0" * 16
    (other_base / "lorafit.json").write_text(json.dumps(record))
    no_module = shutil.copytree(adapters["plain"], library / "no-module")
    config = json.loads((no_module / "adapter_config.json").read_text())
    config["target_modules"] = ["gate_proj_that_is_not_there"]
    (no_module / "adapter_config.json").write_text(json.dumps(config))
    before = ask(client, "plain", max_tokens=12).choices[0].message.content
    for path, says in (
        (str(adapters["plain"]), "outside"),
        ("../rslora/adapter", "outside"),
        ("link", "outside"),
        ("missing", "no such"),
        ("other-base", "trained on"),
        ("no-module", "does not fit"),
    ):
        status, error, _ = server.request("POST", "/v1/adapters", {"name": "x", "path": path}, admin)
        assert status == 400 and says in error["error"]["message"], (path, error)
    assert {m.id for m in client.models.list().data} == {base_id(client), "rslora", "plain", "dora", "saved"}
    assert ask(client, "plain", max_tokens=12).choices[0].message.content == before
    # A rank-16 adapter on every linear layer loads (no rank limit fixed at start-up) and answers as trained.
    status, card, _ = server.request("POST", "/v1/adapters", load, admin)
    assert status == 200 and card["id"] == "big" and card["parent"] == base_id(client)
    assert server.request("POST", "/v1/adapters", load, admin)[0] == 400  # the name is taken
    served = ask(client, "big", max_tokens=24).choices[0].message.content
    assert served == reference_answer(tiny_model_dir, adapters["big"], QUESTION, 24)[0]
    assert server.request("DELETE", "/v1/adapters/big", None, admin)[0] == 200
    with pytest.raises(openai.NotFoundError):
        ask(client, "big")
    assert server.request("DELETE", "/v1/adapters/big", None, admin)[0] == 404
    assert ask(client, "plain", max_tokens=12).choices[0].message.content == before


def test_text_stream_holds_back_what_may_still_become_a_stop_string(tiny_model_dir):
    from transformers import AutoTokenizer

    from lorafit.serve.text import TextStream

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer("Python lists are mutable sequences", add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, ["are mut"])
    out = "".join(stream.add(token) for token in ids) + stream.finish()
    assert out == "Python lists " and stream.stopped
    stream = TextStream(tokenizer, ["are never"])
    emitted, held = "", []
    for at, token in enumerate(ids):
        emitted += stream.add(token)
        decoded = tokenizer.decode(ids[: at + 1])
        assert decoded.startswith(emitted) and "are never".startswith(decoded[len(emitted) :])
        held.append(decoded[len(emitted) :])
    assert "are" in held  # held back until " mutable" showed it was not "are never"
    assert emitted + stream.finish() == "Python lists are mutable sequences" and not stream.stopped


def test_waiting_adapters_take_turns_so_none_starves(tiny_model_dir):
    batcher = ContinuousBatcher(model=None, device=torch.device("cpu"), max_batch=4)
    for i in range(6):
        batcher.add(Sequence([1, 2, 3], Sampling(4), adapter="busy", lane="shared", id=100 + i))
    batcher.add(Sequence([1, 2], Sampling(4), adapter="quiet", lane="shared", id=200))
    picked = [s.adapter for s in batcher._next_waiting(2)]
    assert picked == ["busy", "quiet"]


def test_vllm_engine_gets_the_rank_and_refuses_what_it_would_serve_wrong(adapters, tiny_model_dir):
    from lorafit.errors import UsageError
    from lorafit.serve.vllm import vllm_command

    command = vllm_command(
        {"big": str(adapters["big"]), "plain": str(adapters["plain"])}, str(tiny_model_dir), "127.0.0.1", 8000, None
    )
    assert command[command.index("--max-lora-rank") + 1] == "16"
    assert f"big={adapters['big']}" in command
    for name, says in (("dora", "DoRA"), ("saved", "modules_to_save")):
        with pytest.raises(UsageError, match=says):
            vllm_command({name: str(adapters[name])}, str(tiny_model_dir), "127.0.0.1", 8000, None)


def test_serve_refuses_what_it_cannot_do_before_loading_anything():
    from test_cli import invoke

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = invoke("serve", "--port", str(taken.getsockname()[1]))
    assert result.exit_code == 2 and "cannot listen on 127.0.0.1" in result.output
    result = invoke("serve", "--precision", "fp64")
    assert result.exit_code == 2 and "--precision 'fp64'" in result.output
    result = invoke("serve", "--max-concurrent", "0")
    assert result.exit_code == 2 and "--max-concurrent must be at least 1" in result.output
    result = invoke("serve", "--engine", "vllm")
    assert result.exit_code == 2 and "vLLM is not installed" in result.output
    result = invoke("serve", "--adapter", "x=/no/such/folder")
    assert result.exit_code == 2 and "no such folder" in result.output


def test_a_failed_first_load_leaves_the_bare_base_as_it_was(adapters, tiny_model_dir, tmp_path):
    from lorafit.errors import UsageError
    from lorafit.serve.host import ModelHost

    library = tmp_path / "library"
    broken = shutil.copytree(adapters["plain"], library / "wrong-shape")
    weights = broken / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = {k: torch.cat([v, v], dim=0) if "lora_B" in k else v for k, v in load_file(weights).items()}
    save_file(tensors, weights)  # B matrices of twice the output size: PEFT injects, then cannot load
    host = ModelHost({}, str(tiny_model_dir), "fp32", [library])
    ids = torch.tensor([[5, 6, 7, 8]])
    before = host.model(input_ids=ids).logits
    # A server with no adapter yet answers for the base, as generate does.
    batcher = ContinuousBatcher(host.model, host.device)
    alone = generate_all(batcher, [Sequence([5, 6, 7, 8], Sampling(10), ADAPTER_BASE)])[0].generated
    assert alone == host.model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=[])[0, 4:].tolist()
    with pytest.raises(UsageError, match="does not fit"):
        host.load_runtime("x", "wrong-shape")
    assert type(host.model).__name__ == "LlamaForCausalLM" and "x" not in host.served
    assert not any("lora" in name for name, _ in host.model.named_modules())
    torch.testing.assert_close(host.model(input_ids=ids).logits, before)
    shutil.copytree(adapters["plain"], library / "plain")
    assert host.load_runtime("plain", "plain").lane == "shared"
    host.retire("plain")
    host.drop("plain")
    torch.testing.assert_close(host.model(input_ids=ids).logits, before)
