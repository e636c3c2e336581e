"""A pool of three FakeEngines (Ollama, OpenAI-compatible, TGI) behind one client.

Run: ``python examples/quickstart.py`` (needs the ``testing`` extra for the FakeEngines).
"""

from __future__ import annotations

import asyncio

from shared_ollama import Endpoint, SharedClient, UsageConfig
from shared_ollama.testing import FakeEngine


async def main() -> None:
    """Chat, stream, embed and list across a mixed pool; print where each call went."""
    engines = [
        FakeEngine(kind="ollama", models=("llama3.2:latest",)),
        FakeEngine(kind="openai", models=("meta-llama/Llama-3.2-3B-Instruct",)),
        FakeEngine(kind="tgi", models=("meta-llama/Llama-3.2-3B-Instruct",)),
    ]
    for eng in engines:
        await asyncio.to_thread(eng.start)
    try:
        endpoints = [
            Endpoint(engines[0].url, kind="ollama", models={"llama3.2": "llama3.2:latest"}),
            Endpoint(
                engines[1].url,
                kind="openai",
                api_key="sk-not-shown",
                models={"llama3.2": "meta-llama/Llama-3.2-3B-Instruct"},
            ),
            Endpoint(
                engines[2].url, kind="tgi", models={"llama3.2": "meta-llama/Llama-3.2-3B-Instruct"}
            ),
        ]
        async with SharedClient(
            endpoints=endpoints, project="quickstart", usage=UsageConfig(enabled=False)
        ) as client:
            for _ in range(3):
                r = await client.chat(
                    model="llama3.2", messages=[{"role": "user", "content": "Say hello"}]
                )
                print(f"{r.endpoint:<28} {r.usage.output_tokens} tokens: {r.message.content}")
            print("stream:", end=" ")
            async for chunk in await client.generate(
                model="llama3.2", prompt="Once upon", stream=True
            ):
                print(chunk.response, end="", flush=True)
            print()
            emb = await client.embed(model="llama3.2", input=["a", "b"])
            print("embeddings:", len(emb.embeddings), "x", len(emb.embeddings[0]))
            for status in client.pool_status():
                print(
                    f"{status.name:<18} {status.kind:<7} {status.health:<5} "
                    f"{status.breaker:<7} calls={status.calls}"
                )
    finally:
        for eng in engines:
            await asyncio.to_thread(eng.stop)


if __name__ == "__main__":
    asyncio.run(main())
