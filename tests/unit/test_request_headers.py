"""What reaches the server: request id, project, W3C traceparent, auth (via the transport seam)."""

from __future__ import annotations

import json
import re

import httpx
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared_ollama import Endpoint, HealthPolicy, SyncSharedClient, UsageConfig
from shared_ollama.telemetry import Telemetry

SECRET = "sk-header-secret"


def test_headers_reach_the_server_and_spans_carry_no_secret() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = {
            "model": "m",
            "message": {"role": "assistant", "content": "hi"},
            "done": True,
            "done_reason": "stop",
            "prompt_eval_count": 3,
            "eval_count": 1,
        }
        return httpx.Response(200, json=body)

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    client = SyncSharedClient(
        endpoints=[Endpoint("http://gpu-a:11434", kind="ollama", api_key=SECRET, models=["m"])],
        project="search-team",
        health=HealthPolicy(enabled=False),
        usage=UsageConfig(enabled=False),
        telemetry=Telemetry(tracer_provider=provider),
        transport=httpx.MockTransport(handler),
    )
    with client:
        r = client.chat(model="m", messages=[{"role": "user", "content": "hello"}],
                        project="other-team")  # fmt: skip
    chat = [q for q in seen if q.url.path == "/api/chat"][-1]
    assert chat.headers["x-shared-ollama-project"] == "other-team"
    assert chat.headers["x-request-id"] == r.request_id
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", chat.headers["traceparent"])
    assert chat.headers["authorization"] == f"Bearer {SECRET}"
    assert json.loads(chat.content)["stream"] is False
    (span,) = exporter.get_finished_spans()
    assert span.name == "chat m"
    trace_id = chat.headers["traceparent"].split("-")[1]
    assert f"{span.context.trace_id:032x}" == trace_id
    dumped = json.dumps({k: str(v) for k, v in (span.attributes or {}).items()})
    assert SECRET not in dumped and SECRET not in span.to_json()
