"""The docs' examples are real: the pool.toml reference loads as it is written."""

from __future__ import annotations

import re
from pathlib import Path

from shared_ollama import load_config

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_the_pool_toml_reference_loads(tmp_path: Path) -> None:
    text = (DOCS / "pool_toml.md").read_text(encoding="utf-8")
    match = re.search(r"```toml\n(.*?)```", text, re.S)
    assert match is not None
    path = tmp_path / "pool.toml"
    path.write_text(match.group(1), encoding="utf-8")
    cfg = load_config(path, env={})
    assert [e.name for e in cfg.endpoints] == ["gpu-a", ""]
    assert cfg.endpoints[0].models == {"llama3.2": "llama3.2:3b-instruct-q4_K_M"}
    assert cfg.endpoints[1].api_key is not None and cfg.endpoints[1].proxy is not None
    assert "sk-" not in repr(cfg.endpoints[1])
    assert cfg.budgets["search"].tokens_per_day == 20_000_000
    assert cfg.timeouts.no_endpoint_s == 10.0 and cfg.limits.max_error_bytes == 65536
