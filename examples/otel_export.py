"""Export shared_ollama's telemetry to an OTLP collector and a Prometheus scrape endpoint.

Makes a few calls through ``SharedClient`` against an in-process ``FakeEngine`` (no real
server needed), then prints what Prometheus would scrape and the usage summary.

    pip install 'shared-ollama[otel,testing]'
    python examples/otel_export.py                       # OTLP to localhost:4318, :9464
    python examples/otel_export.py --otlp "" --serve 60  # no OTLP; keep /metrics up a minute

Spans and metrics use the OpenTelemetry GenAI names (see docs/usage_and_telemetry.md): the
v1.41 ones by default, the latest draft ones with
``OTEL_SEMCONV_STABILITY_OPT_IN=gen_ai_latest_experimental`` (``.../dup`` for both).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import httpx

from shared_ollama import Endpoint, SharedClient, UsageConfig
from shared_ollama.records import CallRecord
from shared_ollama.telemetry import configure
from shared_ollama.testing import FakeEngine

MODEL = "fake-llama"


def show(record: CallRecord) -> None:
    """A CallListener: one line per finished call."""
    ttft = f"{record.ttft_s * 1e3:.0f} ms" if record.ttft_s is not None else "-"
    print(
        f"  {record.operation:<9}{record.outcome:<6} {record.duration_s * 1e3:7.1f} ms "
        f"ttft {ttft:>7}  tokens {record.input_tokens}/{record.output_tokens}"
    )


async def make_calls(url: str) -> None:
    """A few plain and streaming chats, accounted to project "demo"."""
    async with SharedClient(
        endpoints=[Endpoint(url, kind="ollama")],
        project="demo",
        listeners=[show],
        # Keep the example's calls out of the per-user ledger.
        usage=UsageConfig(path=":memory:"),
    ) as client:
        for question in ("Why is the sky blue?", "Name three prime numbers."):
            reply = await client.chat(model=MODEL, messages=[{"role": "user", "content": question}])
            print(f"    -> {reply.message.content[:60]!r}")
        chunks = 0
        stream = await client.chat(
            model=MODEL, messages=[{"role": "user", "content": "Count to ten."}], stream=True
        )
        async for _ in stream:
            chunks += 1
        print(f"    -> streamed {chunks} chunks")
        for row in client.usage.summary():
            print(
                f"  usage: project={row.project} model={row.model} requests={row.requests} "
                f"tokens={row.input_tokens}/{row.output_tokens} p50={row.p50_ms} ms"
            )


def scrape(port: int) -> None:
    """Fetch our own /metrics the way Prometheus would and print the GenAI series."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False).text
    for line in text.splitlines():
        if line.startswith(("gen_ai_", "shared_ollama_")) and "_bucket" not in line:
            print(f"  {line}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--otlp",
        default=os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318"),
        help="OTLP/HTTP collector base URL ('' to disable)",
    )
    parser.add_argument("--prometheus-port", type=int, default=9464)
    parser.add_argument("--serve", type=float, default=0, help="keep /metrics up this long (s)")
    args = parser.parse_args()

    # One line of SDK set-up, before the client exists: the client's Telemetry uses the
    # global providers that configure() installs.
    shutdown = configure(
        service_name="otel-export-example",
        otlp_endpoint=args.otlp or None,
        prometheus_port=args.prometheus_port,
    )
    try:
        with FakeEngine(kind="ollama", models=(MODEL,)) as engine:
            print(f"calls to {engine.url}:")
            asyncio.run(make_calls(engine.url))
        port = shutdown.prometheus_port
        assert port is not None
        print(f"scrape of http://127.0.0.1:{port}/metrics:")
        scrape(port)
        if args.serve:
            print(f"serving /metrics for {args.serve:.0f} s")
            asyncio.run(asyncio.sleep(args.serve))
    finally:
        if args.otlp:
            print(f"flushing spans and metrics to {args.otlp} (/v1/traces, /v1/metrics)")
        shutdown()  # exports what is buffered; the exporter logs it if the collector is down
    return 0


if __name__ == "__main__":
    sys.exit(main())
