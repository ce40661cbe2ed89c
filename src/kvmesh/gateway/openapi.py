"""OpenAPI 3 description of the gateway's own API (served at ``/openapi.json``; fuzzed in the tests)."""

from __future__ import annotations

from typing import Any

_ERR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": "integer"}}}}}

_COMMON: dict[str, Any] = {
    "model": {"type": "string", "minLength": 1},
    "stream": {"type": "boolean"},
    "max_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": 64},
    "n": {"type": "integer", "minimum": 1, "maximum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "seed": {"type": "integer"},
    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
}
_PROMPT = {"oneOf": [
    {"type": "string", "maxLength": 2000},
    {"type": "array", "minItems": 1, "maxItems": 4, "items": {"type": "string", "maxLength": 500}},
    {"type": "array", "minItems": 1, "maxItems": 512, "items": {"type": "integer", "minimum": 0, "maximum": 8191}},
]}
_MESSAGES = {"type": "array", "minItems": 1, "maxItems": 8, "items": {
    "type": "object", "required": ["role", "content"],
    "properties": {"role": {"type": "string", "enum": ["system", "user", "assistant"]},
                   "content": {"type": "string", "maxLength": 1000}}}}


def _op(summary: str, schema: dict[str, Any]) -> dict[str, Any]:
    errors = {str(c): {"description": d, "content": {"application/json": {"schema": _ERR}}} for c, d in (
        (400, "invalid request"), (401, "missing or invalid API key"), (404, "unknown model"),
        (413, "body too large"), (429, "over a tenant limit"), (502, "no backend reachable"),
        (503, "no healthy backend / shutting down"))}
    return {"summary": summary, "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": {"200": {"description": "completion (JSON, or SSE when stream=true)"}, **errors}}


def openapi_spec() -> dict[str, Any]:
    completion = {"type": "object", "required": ["model", "prompt"], "properties": {**_COMMON, "prompt": _PROMPT}}
    chat = {"type": "object", "required": ["model", "messages"], "properties": {**_COMMON, "messages": _MESSAGES}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "kvmesh gateway", "version": "0.1.0",
                 "description": "OpenAI-compatible completions and chat, routed to engine replicas."},
        "paths": {
            "/v1/completions": {"post": _op("Text completion", completion)},
            "/v1/chat/completions": {"post": _op("Chat completion", chat)},
            "/v1/models": {"get": {"summary": "Models served", "responses": {"200": {"description": "list"},
                                                                             "503": {"description": "no replica "
                                                                                     "ready yet"}}}},
            "/health": {"get": {"summary": "Liveness", "responses": {"200": {"description": "ok"}}}},
            "/ready": {"get": {"summary": "Readiness", "responses": {"200": {"description": "ready"},
                                                                     "503": {"description": "not ready"}}}},
        },
    }
