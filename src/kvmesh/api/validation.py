"""Request validation for the OpenAI endpoints the gateway proxies.

The gateway checks what it needs to route and what would otherwise reach an engine as garbage: the body is
a JSON object, ``model`` is a non-empty string, ``stream`` a boolean, the prompt / messages have the shapes
the OpenAI API allows, and numeric knobs have the right types.  Fields it does not know are passed through
untouched (engines add their own), so validation never narrows what an engine accepts.
"""

from __future__ import annotations

from typing import Any

import msgspec

from kvmesh.api.errors import ApiError

_json = msgspec.json.Decoder()


def parse_json(body: bytes) -> dict[str, Any]:
    if not body:
        raise ApiError(400, "request body is empty; expected a JSON object")
    try:
        obj = _json.decode(body)
    except msgspec.DecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not valid UTF-8") from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None
    if not isinstance(obj, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(obj).__name__}")
    return obj


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check_prompt(p: object) -> None:
    if isinstance(p, str):
        return
    if isinstance(p, list) and p:
        if all(isinstance(x, str) for x in p) or all(_is_int(x) for x in p):
            return
        if all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in p):
            return
    raise ApiError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of "
                        "token-id lists (non-empty)", param="prompt")


def _check_messages(m: object) -> None:
    if not isinstance(m, list) or not m:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    for i, msg in enumerate(m):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role'", param="messages")
        content = msg.get("content")
        if content is not None and not isinstance(content, str | list):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of parts",
                           param="messages")


_INT_FIELDS = {"max_tokens": 1, "max_completion_tokens": 1, "n": 1, "logprobs": 0, "top_logprobs": 0,
               "seed": None, "best_of": 1}
_NUM_FIELDS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")


def _check_knobs(req: dict[str, Any]) -> None:
    for name, lo in _INT_FIELDS.items():
        v = req.get(name)
        if v is None or (name == "logprobs" and isinstance(v, bool)):
            continue
        if not _is_int(v) or (lo is not None and v < lo):
            bound = f" >= {lo}" if lo is not None else ""
            raise ApiError(400, f"'{name}' must be an integer{bound}, got {v!r}", param=name)
    for name in _NUM_FIELDS:
        v = req.get(name)
        if v is not None and not _is_num(v):
            raise ApiError(400, f"'{name}' must be a number, got {v!r}", param=name)
    stop = req.get("stop")
    if stop is not None and not (isinstance(stop, str) or
                                 (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
    so = req.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")


def validate(endpoint: str, req: dict[str, Any]) -> None:
    """Raise :class:`ApiError` (400) for the first problem found in an OpenAI request body."""
    model = req.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required and must be a non-empty string", param="model")
    if "stream" in req and not isinstance(req["stream"], bool):
        raise ApiError(400, f"'stream' must be a boolean, got {req['stream']!r}", param="stream")
    if endpoint == "completions":
        if "prompt" not in req:
            raise ApiError(400, "'prompt' is required", param="prompt")
        _check_prompt(req["prompt"])
    else:
        _check_messages(req.get("messages"))
    _check_knobs(req)


def prompt_size_estimate(endpoint: str, req: dict[str, Any]) -> int:
    """A cheap prompt-length estimate (tokens ~ chars/4) for load accounting before real tokenisation."""
    if endpoint == "completions":
        p = req["prompt"]
        if isinstance(p, str):
            return len(p) // 4 + 1
        if p and _is_int(p[0]):
            return len(p)
        return sum(len(x) // 4 + 1 if isinstance(x, str) else len(x) for x in p)
    total = 0
    for m in req["messages"]:
        c = m.get("content")
        total += len(c) // 4 + 4 if isinstance(c, str) else 16
    return total
