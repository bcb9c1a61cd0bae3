"""`lorafit serve`: the base model and its adapters behind the OpenAI API."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorafit.cli.app import console

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def serve(
    adapter: Annotated[
        list[str] | None,
        typer.Option("--adapter", metavar="[NAME=]PATH", help="Adapter or run folder to serve as NAME (repeatable)."),
    ] = None,
    base: Annotated[str | None, typer.Option(help="Base model (default: the one the adapters record).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None, typer.Option(envvar="LORAFIT_API_KEY", help="Key clients send as 'Authorization: Bearer KEY'.")
    ] = None,
    admin_key: Annotated[
        str | None,
        typer.Option(envvar="LORAFIT_ADMIN_KEY", help="Key for POST/DELETE /v1/adapters (off without it)."),
    ] = None,
    adapter_dir: Annotated[
        list[Path] | None,
        typer.Option(
            "--adapter-dir", metavar="DIR", help="Folder adapters may be loaded from at run time (repeatable)."
        ),
    ] = None,
    engine: Annotated[str, typer.Option(help="lorafit (built in) or vllm (a GPU machine with vLLM installed).")] = (
        "lorafit"
    ),
    precision: Annotated[str, typer.Option(help="auto, bf16, fp16 or fp32.")] = "auto",
    max_concurrent: Annotated[int, typer.Option(help="Sequences decoded together (the batch).")] = 16,
    max_queue: Annotated[int, typer.Option(help="Sequences that may wait; beyond, 429 with retry-after.")] = 256,
    max_tokens: Annotated[int, typer.Option(help="The most tokens one answer may ask for.")] = 2048,
    max_n: Annotated[int, typer.Option(help="The most choices (n) one request may ask for.")] = 8,
    max_body_bytes: Annotated[int, typer.Option(help="The largest request body accepted (413 beyond).")] = 1 << 20,
    allow_base_mismatch: Annotated[
        bool, typer.Option(help="Load adapters even if they record other base weights.")
    ] = False,
) -> None:
    """Serve the base model and its adapters over the OpenAI API (model = the adapter's name)."""
    from lorafit.adapters.switch import parse_named
    from lorafit.errors import UsageError
    from lorafit.options import check_options

    check_options({"--precision": ("train.precision", precision)})
    for name, value in (
        ("--max-concurrent", max_concurrent),
        ("--max-queue", max_queue),
        ("--max-tokens", max_tokens),
        ("--max-n", max_n),
        ("--max-body-bytes", max_body_bytes),
    ):
        if value < 1:
            raise UsageError(f"{name} must be at least 1 (got {value}).")
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port}: not a port number.")
    named = parse_named(adapter or [])
    check_port_free(host, port)
    if engine == "vllm":
        from lorafit.serve.vllm import serve_with_vllm

        serve_with_vllm(named, base, host, port, api_key, allow_base_mismatch)
        return
    if engine != "lorafit":
        raise UsageError(f"--engine {engine}: use lorafit or vllm.")
    import uvicorn

    from lorafit.serve.app import ServeLimits, create_app
    from lorafit.serve.host import ModelHost
    from lorafit.serve.worker import Worker

    model_host = ModelHost(named, base, precision, adapter_dir or [], allow_base_mismatch)
    worker = Worker(model_host, max_batch=max_concurrent, max_queue=max_queue)
    limits = ServeLimits(api_key, admin_key, max_body_bytes, max_tokens, max_n)
    app = create_app(model_host, worker, limits)
    if host not in LOOPBACK and api_key is None:
        console.print(f"[yellow]warning:[/] listening on {host} without --api-key: anyone who reaches it may use it.")
    models = ", ".join(model_host.served)
    console.print(
        f"serving {models} ({model_host.precision}, {model_host.device.type}) at http://{host}:{port}/v1",
        highlight=False,
        soft_wrap=True,
    )
    worker.start()
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        worker.stop()


def check_port_free(host: str, port: int) -> None:
    """Refuse a taken address before minutes of model loading, not after."""
    import socket

    from lorafit.errors import UsageError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: {exc.strerror or exc}.") from None
    family, kind, _, _, address = infos[0]
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror}); pass another --port.") from None
