"""Hostile input and slow clients: clear 4xx answers, and the gateway keeps serving everyone else."""

from __future__ import annotations

import socket

import httpx

from kvmesh.stack import DEMO_MODEL_NAME, Stack

MODEL = DEMO_MODEL_NAME


def post_raw(url: str, body: bytes) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"})


def test_invalid_utf8_and_deep_nesting_are_400(stack: Stack) -> None:
    url = stack.gateway.url
    r = post_raw(url, b'{"model": "' + MODEL.encode() + b'", "prompt": "\xff\xfe"}')
    assert r.status_code == 400 and "UTF-8" in r.json()["error"]["message"]
    r = post_raw(url, b'{"model": "x", "prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}")
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]
    r = post_raw(url, b'{"model": "' + MODEL.encode() + b'", "prompt": "x", "max_tokens": -1}')
    assert r.status_code == 400
    assert post_raw(url, b'{"model": "' + MODEL.encode() + b'", "prompt": "x", "max_tokens": 1}').status_code == 200


def test_a_slow_client_does_not_block_others(stack: Stack) -> None:
    host, port = stack.gateway.cfg.host, stack.gateway.port
    body = b'{"model": "' + MODEL.encode() + b'", "prompt": "slow", "max_tokens": 1}'
    with socket.create_connection((host, port)) as slow:
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        # One byte at a time, and other clients are served between the bytes: the body is certainly
        # incomplete while they are (no sleep needed to make the client slow).
        for i, byte in enumerate(body):
            slow.sendall(bytes([byte]))
            if i % 10 == 0:
                r = httpx.post(f"{stack.gateway.url}/v1/completions",
                               json={"model": MODEL, "prompt": "fast", "max_tokens": 1}, timeout=30)
                assert r.status_code == 200
        slow.settimeout(30)  # a blocking read with a deadline: the answer comes once the body is complete
        data = slow.recv(65536)
        assert data.startswith(b"HTTP/1.1 200"), data[:200]


def test_a_clients_kv_transfer_params_never_reach_an_engine(stack: Stack) -> None:
    """The P/D handshake is the gateway's: asked by a client to ``do_remote_decode``, a simulated engine
    would answer where its blocks are, and vLLM's NixlConnector would pull KV from a client-named host."""
    body = {"model": MODEL, "prompt": "hello " * 40, "max_tokens": 2,
            "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                                   "remote_block_ids": None, "remote_host": None, "remote_port": None}}
    r = httpx.post(f"{stack.gateway.url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert not r.json().get("kv_transfer_params")
