"""The TTFT floor of this machine: a bare-socket client against a FakeEngine of known TTFT.

Run: ``python benchmarks/ttft_floor.py [--runs 200]``. The engine runs in its own process
with TTFT 50 ms; the client writes a raw HTTP request (TCP_NODELAY, a new connection each
time) and stops its clock at the first byte of the first token. What is left over 50 ms is
the engine's HTTP handling, timer granularity and the kernel: no client, however lean, can
measure TTFT closer than this here (compare with the bench's truth test, tests/bench).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time

from shared_ollama.testing import TimingModel, engine_process

TTFT_MS = 50.0


def main(runs: int) -> None:
    """Measure and print the error distribution over the engine's TTFT."""
    timing = TimingModel(ttft_base_s=TTFT_MS / 1e3, ttft_per_prompt_token_s=0, itl_s=0.05)
    with engine_process(timing=timing, slots=64) as engine:
        port = int(engine.url.rsplit(":", 1)[1])
        body = json.dumps(
            {
                "model": "fake-llama",
                "prompt": "a b c",
                "stream": True,
                "options": {"num_predict": 2},
            }
        ).encode()
        head = "POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        request = f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
        errors = []
        for i in range(runs + 10):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                t0 = time.perf_counter_ns()
                sock.sendall(request)
                seen = b""
                while b'"response"' not in seen:
                    seen += sock.recv(65536)
                if i >= 10:  # the first ones warm the engine up
                    errors.append((time.perf_counter_ns() - t0) / 1e6 - TTFT_MS)
    errors.sort()
    p99 = errors[int(0.99 * (len(errors) - 1))]
    p50 = statistics.median(errors)
    print(f"bare-socket TTFT minus the engine's {TTFT_MS:.0f} ms over {runs} runs: "
          f"p50 {p50:+.3f} ms  p99 {p99:+.3f} ms  min {errors[0]:+.3f} ms")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    main(parser.parse_args().runs)
