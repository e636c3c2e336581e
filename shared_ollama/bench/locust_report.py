"""A Locust run as a bench result: ``python -m shared_ollama.bench report --from-locust DIR``.

``DIR`` is the master's ``--bench-out`` folder (``bench.locust``): ``locust_run.json`` says
how the run was set up, ``records.jsonl`` holds one bench record a call, from every worker.
The result has one closed-loop phase, ``locust``, whose summary is computed as ``bench run``
computes its phases (``metrics.summarize``); its duration is the span from the first call's
start to the last call's end. Times are the workers' wall clocks in nanoseconds since the
epoch (monotonic clocks differ between machines): keep the workers' clocks in sync (NTP).

Imports no Locust: a report can be made where Locust is not installed.
"""

from __future__ import annotations

import contextlib
import json
import platform
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from . import metrics
from .result import BenchResult, PhaseResult, RequestRecord, RunMetadata, write_csv, write_json

__all__ = ["META_FILE", "PHASE", "RECORDS_FILE", "convert", "load_locust_run"]

#: What ``--bench-out`` holds: the run's description, and one bench record a line.
META_FILE = "locust_run.json"
RECORDS_FILE = "records.jsonl"
#: The phase every Locust call is recorded under.
PHASE = "locust"


def _meta(folder: Path) -> dict[str, Any]:
    path = folder / META_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(
            f"{folder}: no {META_FILE} (is it the folder given to the master's --bench-out?)"
        ) from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read it ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != "shared_ollama.bench.locust":
        raise ValueError(f"{path}: not a shared_ollama Locust run")
    return data


def _records(folder: Path) -> Iterator[RequestRecord]:
    path = folder / RECORDS_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"{folder}: no {RECORDS_FILE}: the run recorded no call") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read it ({exc})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield RequestRecord.model_validate_json(line)
        except ValidationError as exc:
            first = exc.errors(include_input=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"{path}:{n}: not a bench record ({where}: {first['msg']})") from None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def load_locust_run(folder: str | Path) -> BenchResult:
    """The result document of the Locust run recorded in ``folder`` (``ValueError`` when
    the folder holds no such run)."""
    where = Path(folder)
    meta = _meta(where)
    requests = sorted(_records(where), key=lambda r: (r.t_start_ns, r.t_end_ns))
    if not requests:
        raise ValueError(f"{where / RECORDS_FILE}: the run recorded no call")
    for seq, req in enumerate(requests, 1):  # each worker counted its own calls
        req.seq = seq
    t_start = requests[0].t_start_ns
    t_end = max(r.t_end_ns for r in requests)
    scenario = meta.get("scenario") if isinstance(meta.get("scenario"), dict) else {}
    assert isinstance(scenario, dict)
    slo = {
        k: float(v)
        for k, v in (scenario.get("slo") or {}).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    summary = metrics.summarize(requests, slo=slo)
    users, rate = _int(meta.get("users")), meta.get("spawn_rate")
    ramp = users / rate if users and isinstance(rate, int | float) and rate > 0 else 0.0
    phase = PhaseResult(
        name=PHASE,
        mode="closed",
        concurrency=users,
        ramp_s=ramp,
        stop_reason="duration",
        t_start_ns=t_start,
        t_end_ns=t_end,
        summary=summary,
    )
    workers = _int(meta.get("workers")) or 0
    started_ns = _int(meta.get("started_ns")) or t_start
    finished_ns = _int(meta.get("finished_ns")) or t_end
    pool = scenario.get("pool") if isinstance(scenario.get("pool"), dict) else {}
    assert isinstance(pool, dict)
    endpoints = [
        {k: str(e.get(k, "")) for k in ("url", "kind", "name")}
        for e in pool.get("endpoints") or ()
        if isinstance(e, dict)
    ]
    where_run = f"{workers} workers" if workers else "one process"
    run = RunMetadata(
        started_at=str(meta.get("started_at") or _iso(started_ns)),
        finished_at=str(meta.get("finished_at") or _iso(finished_ns)),
        wall_duration_s=max(0.0, (finished_ns - started_ns) / 1e9),
        monotonic_origin_ns=started_ns,
        versions=_versions(str(meta.get("locust_version") or "")),
        host=dict(meta.get("host") or {}),
        endpoints=endpoints,
        scenario=scenario,
        seed=_int(meta.get("seed")) or 0,
        notes=[
            f"Locust run: {users or '?'} users on {where_run}; times are the workers' wall "
            "clocks (ns since the epoch)",
            "each Locust worker drew its own workload sequence (seed + worker index)",
        ],
    )
    return BenchResult(
        metadata=run,
        definitions=dict(metrics.DEFINITIONS),
        slo=slo,
        phases=[phase],
        summary=summary,
        requests=requests,
    )


def _iso(epoch_ns: int) -> str:
    return datetime.fromtimestamp(epoch_ns / 1e9, UTC).isoformat()


def _versions(locust: str) -> dict[str, str]:
    out = {"python": platform.python_version()}
    if locust:
        out["locust"] = locust
    with contextlib.suppress(metadata.PackageNotFoundError):
        out["shared-ollama"] = metadata.version("shared-ollama")
    return out


def convert(folder: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's ``result.json`` (default: in ``folder``) and ``requests.csv`` beside
    it; return the JSON's path."""
    result = load_locust_run(folder)
    path = Path(out) if out is not None else Path(folder) / "result.json"
    write_json(result, path)
    write_csv(result.requests, path.with_name("requests.csv"))
    return path
