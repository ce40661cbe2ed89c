"""Tokenise prompts exactly as vLLM will, so the router's block keys equal the engine's blocks.

- Completions: a string prompt is encoded *with* special tokens (vLLM adds BOS the same way); a token-id
  list is taken as is.
- Chat: the model's chat template (``tokenizer_config.json``) is rendered with Jinja2 configured as
  Hugging Face renders it (``trim_blocks``, ``lstrip_blocks``, loop controls, sandboxed), with
  ``add_generation_prompt=True``, and the text is encoded *without* special tokens, since the template
  writes them itself.  ``tests/test_kv_routing_vllm.py`` checks both against vLLM's ``/tokenize``.

Encoding is CPU work: ``encode_*`` are synchronous; the gateway calls them in a thread pool for long
prompts.  Results are cached by content (bounded LRU), because agents and chat clients resend the same
prefixes over and over.
"""

from __future__ import annotations

import collections
import json
import pathlib
import threading
from typing import Any

import jinja2
import jinja2.sandbox
import xxhash
from tokenizers import Tokenizer


class TokenizerError(Exception):
    """The tokenizer or its chat template cannot be loaded or rendered."""


def _raise(msg: str) -> None:
    raise TokenizerError(msg)


class PromptTokenizer:
    def __init__(self, path: str | pathlib.Path, cache_entries: int = 4096) -> None:
        p = pathlib.Path(path)
        try:
            self.tok = Tokenizer.from_file(str(p / "tokenizer.json"))
        except Exception as e:
            raise TokenizerError(f"cannot load {p / 'tokenizer.json'}: {e}") from e
        cfg: dict[str, Any] = {}
        if (p / "tokenizer_config.json").is_file():
            cfg = json.loads((p / "tokenizer_config.json").read_text(encoding="utf-8"))
        self.special = {k: _token_text(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: use "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (p / "chat_template.jinja").is_file():
            template = (p / "chat_template.jinja").read_text(encoding="utf-8")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        self.template = env.from_string(template) if template else None
        self._cache: collections.OrderedDict[int, list[int]] = collections.OrderedDict()
        self._cache_entries = cache_entries
        self._lock = threading.Lock()  # encode_* may run on pool threads

    def _cached(self, text: str, special: bool) -> list[int]:
        key = xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass"), 1 if special else 0)
        with self._lock:
            ids = self._cache.get(key)
            if ids is not None:
                self._cache.move_to_end(key)
                return ids
        ids = self.tok.encode(text, add_special_tokens=special).ids
        with self._lock:
            self._cache[key] = ids
            if len(self._cache) > self._cache_entries:
                self._cache.popitem(last=False)
        return ids

    def encode_prompt(self, prompt: str) -> list[int]:
        return self._cached(prompt, True)

    def render_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        if self.template is None:
            raise TokenizerError("the model has no chat template")
        try:
            return self.template.render(messages=[_flatten(m) for m in messages], add_generation_prompt=True,
                                        **self.special, **kwargs)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template failed: {e}") from e

    def encode_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        return self._cached(self.render_chat(messages, **kwargs), False)


def _token_text(v: object) -> str | None:
    if isinstance(v, dict):
        c = v.get("content")
        return c if isinstance(c, str) else None
    return v if isinstance(v, str) else None


def _flatten(m: dict[str, Any]) -> dict[str, Any]:
    # OpenAI content parts -> the plain string vLLM passes to "string"-format templates.
    c = m.get("content")
    if isinstance(c, list):
        text = "\n".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text")
        return {**m, "content": text}
    if c is None:
        return {**m, "content": ""}
    return m
