"""``python -m shared_ollama.testing``: one FakeEngine in the foreground, its URL the first line
of stdout; drive it over /_fake/ (faults, stats, timing). Stops on SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import get_args

from ._engine import FakeEngine
from ._runtime import Kind
from ._timing import TimingModel


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m shared_ollama.testing",
        description="Run one fake inference engine; prints its URL, then serves until stopped.",
    )
    parser.add_argument("--kind", choices=get_args(Kind), default="ollama")
    parser.add_argument("--model", action="append", dest="models", help="served model (repeatable)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--max-queue", type=int, default=None)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--seed", type=int, default=0)
    for f in dataclasses.fields(TimingModel):
        default = f.default
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=type(default),
            default=default,
            help=f"TimingModel.{f.name} (default {default})",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    timing = TimingModel(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TimingModel)})
    engine = FakeEngine(
        kind=args.kind,
        models=args.models or ("fake-llama",),
        timing=timing,
        slots=args.slots,
        max_queue=args.max_queue,
        api_key=args.api_key,
        host=args.host,
        port=args.port,
        seed=args.seed,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    engine.start()
    print(engine.url, flush=True)
    try:
        stop.wait()
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
