"""What ``httpx.AsyncClient`` used to give each endpoint, now built by the library itself:
proxies (explicit, or from the environment with ``NO_PROXY``), TLS verification and client
certificates. Over real sockets: a loopback forward proxy and a loopback TLS server."""

from __future__ import annotations

import asyncio
import base64
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme

from shared_ollama import (
    ConnectError,
    Endpoint,
    HealthPolicy,
    RetryPolicy,
    SharedClient,
    SharedOllamaError,
    SyncSharedClient,
)
from tests.instant_server import MESSAGES, MODEL
from tests.loopback_net import LoopbackProxy, canned_server

MODES = ["async", "sync"]
_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in _PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.lower(), raising=False)


def chat(mode: str, endpoint: Endpoint) -> Any:
    """One chat through a fresh client of ``mode`` with this one endpoint."""
    kw: dict[str, Any] = {
        "endpoints": [endpoint],
        "health": HealthPolicy(enabled=False),
        "usage": False,
        "retry": RetryPolicy(max_attempts=1),
    }
    if mode == "sync":
        with SyncSharedClient(**kw) as client:
            return client.chat(model=MODEL, messages=MESSAGES)

    async def run() -> Any:
        async with SharedClient(**kw) as client:
            return await client.chat(model=MODEL, messages=MESSAGES)

    return asyncio.run(run())


def endpoint(url: str, **kw: Any) -> Endpoint:
    return Endpoint(url, kind="ollama", models=[MODEL], **kw)


# -- proxies -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_the_environment_proxy_carries_the_call(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with canned_server() as server, LoopbackProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        assert chat(mode, endpoint(server.url)).message.content == "four five six"
    targets = [p.target for p in proxy.seen]  # model discovery at start-up, then the call
    assert targets[-1] == f"{server.url}/api/chat", targets


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "localhost,127.0.0.1", "*"])
def test_no_proxy_sends_the_call_direct(
    mode: str, no_proxy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with canned_server() as server, LoopbackProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", no_proxy)
        assert chat(mode, endpoint(server.url)).message.content == "four five six"
    assert proxy.seen == []


@pytest.mark.parametrize("mode", MODES)
def test_trust_env_false_ignores_the_environment_proxy(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with canned_server() as server, LoopbackProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        chat(mode, endpoint(server.url, trust_env=False))
    assert proxy.seen == []


@pytest.mark.parametrize("mode", MODES)
def test_an_explicit_proxy_with_credentials_is_used_and_never_shown(mode: str) -> None:
    with canned_server() as server, LoopbackProxy() as proxy:
        secret_url = proxy.url.replace("http://", "http://team:s3cret-pw@")
        ep = endpoint(server.url, proxy=secret_url)
        chat(mode, ep)
    forwarded = proxy.seen[-1]
    assert forwarded.target == f"{server.url}/api/chat"
    token = base64.b64encode(b"team:s3cret-pw").decode()
    assert forwarded.headers["proxy-authorization"] == f"Basic {token}"
    assert "s3cret-pw" not in repr(ep) and "s3cret-pw" not in str(ep)
    client = SyncSharedClient(endpoints=[ep], usage=False, health=HealthPolicy(enabled=False))
    try:
        assert "s3cret-pw" not in repr(client)
        assert "s3cret-pw" not in str(client.pool_status())
    finally:
        client.close()


# -- TLS ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_server(ca: trustme.CA, *, client_certs: bool = False) -> Any:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    if client_certs:
        ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    return canned_server(tls=context)


@pytest.mark.parametrize("mode", MODES)
def test_tls_is_verified_against_the_system_cas_by_default(mode: str, ca: trustme.CA) -> None:
    with tls_server(ca) as server, pytest.raises(ConnectError) as err:
        chat(mode, endpoint(server.url, trust_env=False))
    assert "CERTIFICATE_VERIFY_FAILED" in str(err.value), err.value


@pytest.mark.parametrize("mode", MODES)
def test_tls_with_a_ca_bundle_or_without_verification(
    mode: str, ca: trustme.CA, tmp_path: Path
) -> None:
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    with tls_server(ca) as server:
        assert chat(mode, endpoint(server.url, verify=str(bundle))).done
        assert chat(mode, endpoint(server.url, verify=False)).done


@pytest.mark.parametrize("mode", MODES)
def test_tls_cas_from_ssl_cert_file_when_trusting_the_environment(
    mode: str, ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    with tls_server(ca) as server:
        assert chat(mode, endpoint(server.url)).done
        with pytest.raises(ConnectError):
            chat(mode, endpoint(server.url, trust_env=False))


@pytest.mark.parametrize("mode", MODES)
def test_tls_client_certificate(mode: str, ca: trustme.CA, tmp_path: Path) -> None:
    bundle, mine = tmp_path / "ca.pem", tmp_path / "client.pem"
    ca.cert_pem.write_to_path(str(bundle))
    ca.issue_cert("client@example.org").private_key_and_cert_chain_pem.write_to_path(str(mine))
    with tls_server(ca, client_certs=True) as server:
        assert chat(mode, endpoint(server.url, verify=str(bundle), cert=str(mine))).done
        with pytest.raises(SharedOllamaError):  # the server refuses the handshake
            chat(mode, endpoint(server.url, verify=str(bundle)))
