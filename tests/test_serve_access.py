"""Access to the server: API keys as bearer tokens on every route but the page and the health
checks (401 without one, constant-time comparison), keys from flags, a file and the environment,
and HTTPS through uvicorn's key and certificate."""

from __future__ import annotations

import argparse
import shutil
import subprocess

import httpx
import pytest

from serving import running_server

KEYS = ["k" * 20, "second-key-0123456789"]


@pytest.fixture(scope="module")
def guarded(classifier):
    with running_server(classifier, api_keys=KEYS) as (base_url, _):
        yield base_url


def image(tiny_run) -> bytes:
    return next(p for p in sorted((tiny_run[1] / "val").rglob("*")) if p.is_file()).read_bytes()


def test_health_and_the_page_stay_open(guarded) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", "/"):
        assert httpx.get(guarded + path).status_code == 200, path


def test_inference_and_management_need_a_key(guarded, tiny_run) -> None:
    body = image(tiny_run)
    for method, path, kwargs in (
        ("POST", "/predict", {"content": body}), ("POST", "/explain", {"content": body}), ("GET", "/metrics", {}), ("GET", "/v2", {}),
        ("GET", "/v2/models/imgrec", {}), ("POST", "/v2/models/imgrec/infer", {"json": {"inputs": []}}),
    ):  # fmt: skip
        for headers in ({}, {"Authorization": "Bearer wrong-key-wrong-key"}, {"Authorization": f"Basic {KEYS[0]}"}):
            answer = httpx.request(method, guarded + path, headers=headers, **kwargs)
            assert answer.status_code == 401, (path, headers, answer.text)
            assert answer.json()["kind"] == "unauthorized" and answer.headers["www-authenticate"].startswith("Bearer")
    for key in KEYS:
        answer = httpx.post(guarded + "/predict", content=body, headers={"Authorization": f"Bearer {key}", "content-type": "image/png"})
        assert answer.status_code == 200 and answer.json()["top"], answer.text
    assert httpx.get(guarded + "/metrics", headers={"Authorization": f"bearer {KEYS[1]}"}).status_code == 200  # the scheme's case does not matter


def test_keys_come_from_flags_a_file_and_the_environment(tmp_path, monkeypatch) -> None:
    from imgrec.cli.deploy import api_keys

    (tmp_path / "keys").write_text("# ours\n" + KEYS[0] + "\n\n" + KEYS[1] + "\n")
    monkeypatch.setenv("IMGREC_API_KEYS", "env-key-0123456789abc, ")
    args = argparse.Namespace(api_key=["flag-key-0123456789ab"], api_key_file=str(tmp_path / "keys"))
    assert api_keys(args) == ["flag-key-0123456789ab", *KEYS, "env-key-0123456789abc"]
    monkeypatch.delenv("IMGREC_API_KEYS")
    with pytest.raises(ValueError, match="too easy to guess: use at least 16"):
        api_keys(argparse.Namespace(api_key=["short"], api_key_file=None))
    with pytest.raises(ValueError, match="--api-key-file .*nokeys"):
        api_keys(argparse.Namespace(api_key=None, api_key_file=str(tmp_path / "nokeys")))
    assert api_keys(argparse.Namespace(api_key=None, api_key_file=None)) == []


def test_https_with_a_key_and_certificate(classifier, tmp_path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a self-signed certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    with running_server(classifier, ssl=(str(key), str(cert))) as (base_url, _):
        assert base_url.startswith("https://")
        assert httpx.get(base_url + "/v2/health/live", verify=False).json() == {"live": True}
        with pytest.raises((httpx.ConnectError, httpx.RemoteProtocolError)):
            httpx.get(base_url.replace("https", "http") + "/v2/health/live")  # plain HTTP to the TLS port gets no answer
