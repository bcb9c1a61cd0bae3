"""`lorafit ui`: the run folders' statuses, curves and reports over HTTP, its security rules, and
the page end to end in a real browser (Playwright driving Debian's chromium)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from test_cli import make_corpus, write_config

from lorafit.ui import runs as run_files
from lorafit.ui.app import UiSettings, create_app

ARTIFACTS = Path(os.environ.get("LORAFIT_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


def lorafit(*args: str, home: Path, fault: str | None = None, wait: bool = True):
    env = {k: v for k, v in os.environ.items() if k != "LORAFIT_FAULT"}
    env["LORAFIT_HOME"] = str(home)
    if fault:
        env["LORAFIT_FAULT"] = fault
    command = [sys.executable, "-m", "lorafit.cli", *args]
    if wait:
        return subprocess.run(command, capture_output=True, text=True, env=env)
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def config_for(tmp_path: Path, model_dir: Path, **train) -> Path:
    path = write_config(tmp_path, model_dir, make_corpus(tmp_path / "docs"), **train)
    config = yaml.safe_load(path.read_text())
    config["eval"]["general"] = []  # faster: no forgetting measurement
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, tiny_model_dir):
    """Two finished runs, a stopped one (SIGTERM after step 4: checkpoint), a failed one and a
    `lorafit eval` report folder."""
    tmp = tmp_path_factory.mktemp("ui")
    home, root = tmp / "home", tmp / "runs"
    home.mkdir()
    root.mkdir()
    config = config_for(tmp, tiny_model_dir, max_steps=6, save_every=3, eval_every=3)
    assert lorafit("train", str(config), "--out", str(root / "done"), home=home).returncode == 0
    second = lorafit("train", str(config), "--out", str(root / "second"), "--set", "train.lr=2e-2", home=home)
    assert second.returncode == 0, second.stdout + second.stderr
    evaluated = lorafit("eval", "--adapter", str(root / "done"), "--out", str(root / "eval-done"), home=home)
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    stopped = lorafit("train", str(config), "--out", str(root / "paused"), home=home, fault="term_after_step:4")
    assert stopped.returncode == 130, stopped.stdout + stopped.stderr
    (root / "broken").mkdir()
    (root / "broken" / "config.yaml").write_text("train: {max_steps: 5}\n")
    (root / "notes").mkdir()  # not a run: not listed
    return root


def client_for(root: Path, **settings) -> tuple[TestClient, UiSettings]:
    ui = UiSettings(runs=root, **settings)
    return TestClient(create_app(ui), base_url="http://127.0.0.1:7860"), ui


def test_runs_are_listed_with_their_status_from_the_folders(runs_root):
    client, _ = client_for(runs_root)
    listing = client.get("/api/runs").json()
    status = {r["name"]: r["status"] for r in listing["runs"]}
    assert status == {"done": "finished", "second": "finished", "paused": "stopped", "broken": "failed"}
    assert listing["reports"] == ["eval-done"]  # lorafit eval's report folder, openable too
    assert "lorafit evaluation report" in client.get("/runs/eval-done/report").text
    done = next(r for r in listing["runs"] if r["name"] == "done")
    assert done["steps"] == done["max_steps"] == 6 and done["has_report"] and done["valid_ppl_after"] > 0
    detail = client.get("/api/runs/done").json()
    assert "max_steps: 6" in detail["config_yaml"] and detail["summary"]["steps"] == 6
    records = client.get("/api/runs/done/metrics").json()["records"]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert client.get("/runs/done/report").text.startswith("<!DOCTYPE html>")
    assert client.get("/runs/paused/report").status_code == 404


def test_compare_shows_figures_side_by_side_and_the_config_keys_that_differ(runs_root, tmp_path):
    client, _ = client_for(runs_root)
    same = client.get("/api/compare", params={"a": "done", "b": "paused"}).json()
    figures = {row[0]: row[1:] for row in same["figures"]}
    assert figures["steps"] == [6, None]  # the stopped run has no summary yet
    assert figures["trainable parameters"][0] > 0
    assert same["config_differences"] == []  # same config; `out` is not a difference
    other = runs_root / "other"
    shutil.copytree(runs_root / "done", other)
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["train"]["lr"], config["lora"]["r"] = 0.01, 8
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    try:
        differ = client.get("/api/compare", params={"a": "done", "b": "other"}).json()["config_differences"]
        assert differ == [["lora.r", 4, 8], ["train.lr", 0.005, 0.01]]
    finally:
        shutil.rmtree(other)
    assert client.get("/api/compare", params={"a": "done", "b": ".."}).status_code == 404


def test_paths_stay_under_runs_and_actions_need_the_page_token(runs_root, tmp_path):
    client, ui = client_for(runs_root)
    (runs_root.parent / "outside").mkdir(exist_ok=True)
    (runs_root.parent / "outside" / "config.yaml").write_text("{}\n")
    for name in ("..", "..%2Foutside", "%2e%2e", "notes", "nothing"):
        assert client.get(f"/api/runs/{name}").status_code == 404, name
    assert client.get("/runs/..%2F..%2Fetc%2Fpasswd/report").status_code == 404
    # No token (a page of another site posting here): refused, and nothing is started.
    assert client.post("/api/runs/paused/resume").status_code == 403
    assert client.post("/api/runs/paused/resume", headers={"X-Lorafit-Token": "guess"}).status_code == 403
    assert client.post("/api/runs/paused/resume", headers={"X-Lorafit-Token": b"g\xfcess"}).status_code == 403
    assert run_files.describe_run(runs_root / "paused").status == "stopped"
    # The page carries the token; a run that is not running cannot be stopped.
    page = client.get("/").text
    assert f'content="{ui.token}"' in page
    refused = client.post("/api/runs/done/stop", headers={"X-Lorafit-Token": ui.token})
    assert refused.status_code == 409 and "not running" in refused.json()["detail"]
    # A DNS-rebinding page reaches the loopback server under another host name: refused.
    assert client.get("/api/runs", headers={"host": "evil.example:7860"}).status_code == 403


def test_beyond_loopback_every_request_needs_the_api_key(runs_root):
    client, _ = client_for(runs_root, host="0.0.0.0", api_key="s3cret")
    assert client.get("/api/runs").status_code == 401
    assert client.get("/").status_code == 401
    assert client.get("/?key=wrong").status_code == 401
    login = client.get("/?key=s3cret", follow_redirects=False)
    assert login.status_code == 303 and "lorafit_ui_key" in login.headers["set-cookie"]
    assert client.get("/api/runs").status_code == 200  # the cookie now
    assert (
        TestClient(create_app(UiSettings(runs=runs_root, host="0.0.0.0", api_key="s3cret")))
        .get("/api/runs", headers={"Authorization": "Bearer s3cret"})
        .status_code
        == 200
    )


def test_the_command_refuses_an_open_host_without_a_key(tmp_path):
    from test_cli import invoke

    result = invoke("ui", "--runs", str(tmp_path), "--host", "0.0.0.0")
    assert result.exit_code == 2 and "--api-key" in result.output


def test_metrics_are_read_up_to_the_last_complete_line(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("{}\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    records, next_line = run_files.read_metrics(run)
    assert records == [{"step": 1, "loss": 2.0}] and next_line == 1
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('ss": 1.5}\n')
    assert run_files.read_metrics(run, next_line) == ([{"step": 2, "loss": 1.5}], 2)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture()
def served(runs_root):
    import uvicorn

    port = free_port()
    settings = UiSettings(runs=runs_root, port=port)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium_path() is None, reason="Debian's chromium is not installed (scripts/test.sh installs it)")
def test_page_end_to_end_in_a_browser(served, runs_root, tiny_model_dir, tmp_path, monkeypatch):
    """A run started from a shell appears, its curve gains points live, Stop checkpoints it, Resume
    finishes it, its report opens; screenshots of each view go to test-artifacts/ui/."""
    from playwright.sync_api import expect, sync_playwright

    shots = ARTIFACTS / "ui"
    shots.mkdir(parents=True, exist_ok=True)
    home = runs_root.parent / "home"
    config = config_for(tmp_path, tiny_model_dir, max_steps=400, save_every=5, eval_every=50)
    # Slow steps: the tiny model would finish before the page could watch it.
    live = lorafit(
        "train", str(config), "--out", str(runs_root / "live"), home=home, fault="slow_steps:150", wait=False
    )
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(served)
            row = page.locator('tr[data-run="live"]')
            expect(row).to_have_attribute("data-status", "running", timeout=60_000)
            page.locator('tr[data-run="done"] input[type=checkbox]').check()
            page.locator('tr[data-run="live"] input[type=checkbox]').check()
            chart = page.locator("#chart")
            expect(chart.locator("canvas")).to_be_visible()
            first = int(chart.get_attribute("data-points"))
            deadline = time.monotonic() + 60
            while int(chart.get_attribute("data-points")) < first + 5 and time.monotonic() < deadline:
                page.wait_for_timeout(500)
            assert int(chart.get_attribute("data-points")) >= first + 5  # the live run's curve grows
            page.screenshot(path=str(shots / "1-runs-live-curves.png"))

            row.get_by_role("button", name="Stop").click()
            expect(row).to_have_attribute("data-status", "stopped", timeout=60_000)
            assert live.wait(timeout=60) == 130
            stopped_at = run_files.describe_run(runs_root / "live").steps
            page.screenshot(path=str(shots / "2-stopped.png"))

            # Resume from the page, then let it finish quickly: its config's max_steps is cut first.
            data = yaml.safe_load((runs_root / "live" / "config.yaml").read_text())
            assert data["train"]["max_steps"] == 400
            # The page's server starts the resumed run with its own environment: slow too.
            monkeypatch.setenv("LORAFIT_FAULT", "slow_steps:150")
            row.get_by_role("button", name="Resume").click()
            expect(row).to_have_attribute("data-status", "running", timeout=60_000)
            expect(page.locator("#message")).to_contain_text("Resumed live")
            deadline = time.monotonic() + 60
            while run_files.describe_run(runs_root / "live").steps <= stopped_at and time.monotonic() < deadline:
                time.sleep(0.5)
            assert run_files.describe_run(runs_root / "live").steps > stopped_at  # it continued
            page.screenshot(path=str(shots / "3-resumed.png"))
            row.get_by_role("button", name="Stop").click()
            expect(row).to_have_attribute("data-status", "stopped", timeout=60_000)

            # The finished run's details and report.
            page.locator('tr[data-run="done"] a.run-name').click()
            expect(page.locator("#detail-config")).to_contain_text("max_steps: 6")
            page.screenshot(path=str(shots / "4-run-details.png"))
            with page.expect_popup() as popup:
                page.locator('tr[data-run="done"] a', has_text="report").click()
            report = popup.value
            expect(report.locator("h1")).to_have_text("lorafit evaluation report")
            report.screenshot(path=str(shots / "5-report.png"), full_page=True)
            browser.close()
    finally:
        if live.poll() is None:
            live.kill()
        log = runs_root / "live" / run_files.LAUNCH_LOG
        if log.is_file():
            print(log.read_text()[-3000:])
    assert json.loads((runs_root / "live" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 0


def form_values(tiny_model_dir: Path, data: Path, **overrides) -> dict:
    values = {"model.base": str(tiny_model_dir), "data.train": str(data), "data.min_chars": "50"}
    values.update({"train.max_steps": "4", "train.seq_len": "32", "train.precision": "fp32", "eval.general": "[]"})
    values.update({"lora.r": "4", "lora.target_modules": "[q_proj, v_proj]", "train.eval_every": "2"})
    values.update(overrides)
    return values


def test_the_form_has_every_config_key_and_checks_values_by_field(tmp_path, tiny_model_dir):
    from test_readmes import config_keys

    root = tmp_path / "runs"
    root.mkdir()
    client, ui = client_for(root)
    form = client.get("/api/form").json()
    fields = {f["key"]: f for f in form["fields"]}
    assert set(fields) == config_keys()
    assert fields["train.lr"]["kind"] == "number" and fields["train.lr"]["default"] == 2e-4
    assert fields["train.method"]["kind"] == "choice" and fields["train.method"]["choices"] == ["lora", "full"]
    assert fields["lora.use_rslora"]["kind"] == "boolean" and fields["lora.target_modules"]["kind"] == "yaml"
    assert all(f["description"] for f in form["fields"])
    # What the form shows as defaults is what the config takes (one line each, as a text box holds it).
    shown = {f["key"]: f["default"] for f in form["fields"]}
    assert all("\n" not in str(value) for value in shown.values())
    token = {"X-Lorafit-Token": ui.token}
    as_shown = {"name": "d", "values": {**shown, "data.train": str(tmp_path)}}
    assert client.post("/api/check", json=as_shown, headers=token).status_code == 200
    data = make_corpus(tmp_path / "docs")
    bad = form_values(tiny_model_dir, data, **{"train.lr": "-1", "lora.rank_pattern": "{unclosed", "train.nope": "1"})
    errors = client.post("/api/check", json={"name": "x", "values": bad}, headers=token).json()["errors"]
    assert set(errors) == {"lora.rank_pattern", "train.nope"}  # YAML and key errors first, by field
    bad = form_values(tiny_model_dir, data, **{"train.lr": "-1", "train.method": "half"})
    errors = client.post("/api/check", json={"name": "x", "values": bad}, headers=token).json()["errors"]
    assert "greater than 0" in errors["train.lr"] and "train.method" in errors
    for name in ("", "../up", "a/b"):
        response = client.post("/api/check", json={"name": name, "values": {}}, headers=token)
        assert response.status_code == 422 and "name" in response.json()["errors"]
    good = client.post("/api/check", json={"name": "r1", "values": form_values(tiny_model_dir, data)}, headers=token)
    assert good.status_code == 200
    assert good.json()["command"] == f"lorafit train {root / 'r1.yaml'} --out {root / 'r1'}"
    assert "max_steps: 4" in good.json()["yaml"]
    body = {"name": "r1", "values": form_values(tiny_model_dir, data), "processes": 2}
    two = client.post("/api/check", json=body, headers=token).json()
    assert two["command"].endswith("--launcher accelerate --num-processes 2")


def test_preview_shows_documents_or_the_trained_tokens_of_examples(tmp_path, tiny_model_dir):
    from conftest import write_jsonl

    root = tmp_path / "runs"
    root.mkdir()
    client, ui = client_for(root)
    token = {"X-Lorafit-Token": ui.token}
    docs = make_corpus(tmp_path / "docs")
    shown = client.post("/api/preview", json={"values": form_values(tiny_model_dir, docs)}, headers=token).json()
    assert shown["kind"] == "documents" and len(shown["items"]) == 3 and "Python" in shown["items"][0]["text"]
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"instruction": f"What is {n}?", "output": f"It is {n}."} for n in "abcd"])
    shown = client.post("/api/preview", json={"values": form_values(tiny_model_dir, qa)}, headers=token).json()
    assert shown["kind"] == "examples" and shown["format"] == "alpaca"
    first = shown["items"][0]["segments"]
    assert [trained for _, trained in first] == [False, True]
    assert "What is a?" in first[0][0] and first[1][0].startswith("It is a.")
    nothing = {"values": form_values(tiny_model_dir, tmp_path / "none")}
    missing = client.post("/api/preview", json=nothing, headers=token)
    assert missing.status_code == 422 and "data.train" in missing.json()["errors"]


def test_starting_a_run_from_the_form_writes_its_config_beside_it_and_trains(tmp_path, tiny_model_dir, isolated_home):
    root = tmp_path / "runs"
    root.mkdir()
    client, ui = client_for(root)
    token = {"X-Lorafit-Token": ui.token}
    values = form_values(tiny_model_dir, make_corpus(tmp_path / "docs"))
    started = client.post("/api/runs", json={"name": "first", "values": values}, headers=token)
    assert started.status_code == 200, started.text
    config = yaml.safe_load((root / "first.yaml").read_text())
    assert config["train"]["max_steps"] == 4 and config["out"] == str(root / "first")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and run_files.describe_run_if_any(root / "first") != "finished":
        time.sleep(0.5)
    assert run_files.describe_run(root / "first").status == "finished", (root / "first.log").read_text()[-2000:]
    again = client.post("/api/runs", json={"name": "first", "values": values}, headers=token)
    assert again.status_code == 422 and "exists already" in again.json()["errors"]["name"]


@pytest.mark.skipif(chromium_path() is None, reason="Debian's chromium is not installed (scripts/test.sh installs it)")
def test_new_run_form_in_a_browser(served, runs_root, tiny_model_dir, tmp_path):
    """Fill the form, see an invalid value refused at its field, preview the data, start the run
    and watch it finish; screenshots of each view."""
    from playwright.sync_api import expect, sync_playwright

    shots = ARTIFACTS / "ui"
    shots.mkdir(parents=True, exist_ok=True)
    values = form_values(tiny_model_dir, make_corpus(tmp_path / "docs"), **{"train.max_steps": "-3"})
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(served)
        expect(page.locator('[name="train.max_steps"]')).to_have_value("100")  # the default, from the schema
        page.fill("#run-name", "from-form")
        for section in ("lora", "train", "eval"):
            page.locator("summary", has_text=section).first.click()
        for key, value in values.items():
            page.locator(f'[name="{key}"]').fill(value) if key != "train.precision" else page.select_option(
                f'[name="{key}"]', value
            )
        page.click("#check-button")
        error = page.locator('.error[data-for="train.max_steps"]')
        expect(error).to_contain_text("greater than or equal to 1")
        page.locator('[name="train.max_steps"]').scroll_into_view_if_needed()
        page.screenshot(path=str(shots / "6-form-field-error.png"))

        page.locator('[name="train.max_steps"]').fill("6")
        page.click("#preview-button")
        expect(page.locator(".field.invalid")).to_have_count(0)
        expect(page.locator("#preview pre").first).to_contain_text("Python")
        expect(error).to_have_text("")
        page.locator("#preview").scroll_into_view_if_needed()
        page.screenshot(path=str(shots / "7-data-preview.png"))

        page.click("#start-button")
        expect(page.locator("#command")).to_contain_text(f"lorafit train {runs_root / 'from-form.yaml'}")
        row = page.locator('tr[data-run="from-form"]')
        expect(row).to_have_attribute("data-status", "finished", timeout=120_000)
        page.locator("#runs").scroll_into_view_if_needed()
        page.screenshot(path=str(shots / "8-started-from-the-form.png"))

        page.select_option("#compare-a", "done")
        page.select_option("#compare-b", "from-form")
        page.click("#compare-button")
        expect(page.locator("#compare-config")).to_contain_text("train.eval_every")
        expect(page.locator("#compare-figures")).to_contain_text("validation perplexity after")
        page.locator("#compare-panel").scroll_into_view_if_needed()
        page.screenshot(path=str(shots / "9-compare.png"))
        browser.close()
    assert yaml.safe_load((runs_root / "from-form.yaml").read_text())["train"]["max_steps"] == 6


def test_chat_asks_the_base_and_an_adapter_through_the_serve_app_and_saves_a_record(runs_root):
    from lorafit.data.formats import detect_file_format, field_names

    with client_for(runs_root)[0] as client:  # the context runs the app's lifespan (the worker stops)
        token = {"X-Lorafit-Token": client.get("/").text.split('name="lorafit-token" content="')[1].split('"')[0]}
        offered = client.get("/api/chat/choices").json()["adapters"]  # the runs with an adapter
        assert {"done", "second"} <= set(offered) and not {"paused", "broken"} & set(offered)
        assert client.post("/serve/v1/chat/completions", json={}, headers=token).status_code == 503
        too_many = client.post("/api/chat/models", json={"adapters": ["done"] * 4}, headers=token)
        assert too_many.status_code == 422 and "at most 3" in too_many.json()["error"]
        assert client.post("/api/chat/models", json={"adapters": ["../x"]}, headers=token).status_code == 404
        chosen = {"adapters": ["done", "second"]}
        models = client.post("/api/chat/models", json=chosen, headers=token).json()["models"]
        assert models[1:] == ["done", "second"] and models[0]  # the base the adapters record, then them
        request = {"messages": [{"role": "user", "content": "Python lists"}], "max_tokens": 6, "temperature": 0}
        answers = {}
        for model in models:
            reply = client.post("/serve/v1/chat/completions", json={**request, "model": model}, headers=token)
            assert reply.status_code == 200, reply.text
            assert reply.json()["model"] == model and reply.json()["usage"]["completion_tokens"] > 0
            answers[model] = reply.json()["choices"][0]["message"]["content"]
        assert client.post("/serve/v1/chat/completions", json={**request, "model": "done"}).status_code == 403
        saved = client.post(
            "/api/chat/save",
            json={"file": "picked", "prompt": "Python lists", "answers": answers, "chosen": "done"},
            headers=token,
        )
        assert saved.status_code == 200 and saved.json()["records"] == 1
        outside = {"file": "../x", "prompt": "p", "answers": answers, "chosen": "done"}
        bad = client.post("/api/chat/save", json=outside, headers=token)
        assert bad.status_code == 422
    path = runs_root / "chat-records" / "picked.jsonl"
    record = json.loads(path.read_text())
    assert record["instruction"] == "Python lists" and record["output"] == answers["done"]
    assert detect_file_format(path, field_names({}), "text") == "alpaca"  # lorafit train reads it as it is
    shutil.rmtree(runs_root / "chat-records")


@pytest.mark.skipif(chromium_path() is None, reason="Debian's chromium is not installed (scripts/test.sh installs it)")
def test_chat_side_by_side_in_a_browser(served, runs_root):
    """Load the base with an adapter, ask one prompt, read both answers side by side, save one."""
    from playwright.sync_api import expect, sync_playwright

    shots = ARTIFACTS / "ui"
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(served)
        page.locator('input[name="chat-adapter"][value="done"]').check()
        page.locator('input[name="chat-adapter"][value="second"]').check()
        page.click("#chat-load")
        expect(page.locator("#chat-loaded")).to_contain_text("done, second", timeout=120_000)
        page.fill("#chat-prompt", "Python lists")
        page.fill("#chat-max-tokens", "8")
        page.click("#chat-ask")
        answers = page.locator("#chat-answers .answer")
        expect(answers).to_have_count(3)  # the base and two adapters
        expect(page.locator('#chat-answers .answer[data-done="1"]')).to_have_count(3, timeout=120_000)
        texts = answers.locator("pre").all_inner_texts()
        assert all(text and not text.startswith("error") for text in texts), texts
        page.fill("#chat-file", "browser")
        page.click("#chat-save")
        expect(page.locator("#message")).to_contain_text("1 records")
        page.locator("#chat-panel").scroll_into_view_if_needed()
        page.screenshot(path=str(shots / "10-chat-side-by-side.png"))
        browser.close()
    record = json.loads((runs_root / "chat-records" / "browser.jsonl").read_text())
    assert record["chosen"] == "second" and record["output"] == texts[-1] and len(record["answers"]) == 3
    shutil.rmtree(runs_root / "chat-records")
