"""Tokenise prompts exactly as vLLM will, so the router's block keys equal the engine's blocks.

- Completions: a string prompt is encoded *with* special tokens (vLLM adds BOS the same way); a token-id
  list is taken as is.
- Chat: the model's chat template (``tokenizer_config.json``) is rendered with Jinja2 configured as
  Hugging Face renders it (``trim_blocks``, ``lstrip_blocks``, loop controls, sandboxed), with
  ``add_generation_prompt=True``, and the text is encoded *without* special tokens, since the template
  writes them itself.  ``tests/test_kv_routing_vllm.py`` checks both against vLLM's ``/tokenize``.

Encoding is CPU work: ``encode_*`` are synchronous; the gateway calls them in a thread pool for long
prompts.  Encodes go through ``Tokenizer.encode_batch``, which (unlike ``encode``) releases the GIL, so a
worker thread really leaves the event loop free.  Agents and chat clients resend the same prefixes over and
over: :mod:`kvmesh.tokenize.prefix` reuses the ids (and block keys) of an already-encoded prefix and encodes
only the rest, exactly.
"""

from __future__ import annotations

import bisect
import json
import logging
import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer

from kvmesh.index.hashing import block_keys
from kvmesh.tokenize.prefix import MARGIN, Cuts, Entry, Plan, PrefixCache, cut_points, reuse_supported

log = logging.getLogger(__name__)


class TokenizerError(Exception):
    """The tokenizer or its chat template cannot be loaded or rendered."""


def _raise(msg: str) -> None:
    raise TokenizerError(msg)


class Encoded(NamedTuple):
    ids: list[int]
    keys: list[int] | None  # chained block keys of ``ids``, when a block size was given
    reused: int  # leading ids taken from the prefix cache (0: a full encode)


class Partial(NamedTuple):
    """What :meth:`PromptTokenizer.encode_held` encoded: the exact leading ``ids`` (all of them when
    ``complete``), the keys of their whole blocks, and the whole text's token count (estimated from the
    characters per token so far unless ``complete``)."""

    ids: list[int]
    keys: list[int]
    total: int
    complete: bool


# encode_held's step (~130 tokens of English; ~0.15 ms of encoding): what it may encode past the first block
# no engine holds.  Within half a step of the end, the whole text is encoded.
LAZY_STEP_CHARS = 512


class PromptTokenizer:
    """A model's tokenizer and chat template.  ``prefix_cache=False`` encodes every text in full."""

    def __init__(self, path: str | pathlib.Path, cache_entries: int = 4096, cache_tokens: int = 1 << 20,
                 prefix_cache: bool = True) -> None:
        p = pathlib.Path(path)
        try:
            tok_cfg = json.loads((p / "tokenizer.json").read_text(encoding="utf-8"))
            self.tok = Tokenizer.from_str(json.dumps(tok_cfg))
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
        self.cache: PrefixCache | None = None
        if prefix_cache and reuse_supported(tok_cfg):
            self.cache = PrefixCache(cache_entries, cache_tokens)
        self._wrap = self._special_wrap()

    def _special_wrap(self) -> tuple[list[int], list[int]] | None:
        """The ids the post-processor puts around a single text (BOS, ...), when it is a fixed wrap."""
        wrap: tuple[list[int], list[int]] | None = None
        for probe in ("a", "Hello world, 12 34!"):
            plain = self.tok.encode(probe, add_special_tokens=False).ids
            full = self.tok.encode(probe, add_special_tokens=True).ids
            for i in range(len(full) - len(plain) + 1):
                if full[i:i + len(plain)] == plain:
                    w = (full[:i], full[i + len(plain):])
                    break
            else:
                return None
            if wrap is not None and w != wrap:
                return None
            wrap = w
        return wrap

    def encode_prompt(self, prompt: str) -> list[int]:
        return self.encode(prompt, True).ids

    def render_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        if self.template is None:
            raise TokenizerError("the model has no chat template")
        try:
            return self.template.render(messages=[_flatten(m) for m in messages], add_generation_prompt=True,
                                        **self.special, **kwargs)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template failed: {e}") from e

    def encode_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        # the template writes the special tokens itself
        return self.encode(self.render_chat(messages, **kwargs), False).ids

    def encode(self, text: str, special: bool, block_size: int | None = None, seed: int = 0) -> Encoded:
        """Ids of ``text`` (with the post-processor's special tokens when ``special``) and, given a block
        size, their block keys; equal to a full encode, whatever the cache holds."""
        return self.finish(self.plan(text), special, block_size, seed)

    def encode_held(self, text: str, special: bool, block_size: int, seed: int,
                    held: Callable[[int], bool]) -> Partial:
        """Encode ``text`` only as far as some engine may hold its blocks, and stop after the first block
        ``held`` denies: routing matches a prefix, so the ids after it change nothing but the prompt's
        length, which is estimated instead (characters per token so far).

        A prefix already in the prefix cache costs no encoding (its ids and keys are reused); the rest is
        encoded in steps of :data:`LAZY_STEP_CHARS`.  The ids returned are exact: a step's ids are kept only
        up to a cut point (a word start :data:`MARGIN` characters before the step ends), for the same reason
        the prefix cache's reuse is exact.  Without cut points (an unsupported tokenizer, an unusual
        post-processor) the whole text is encoded."""
        if self.cache is None or (special and self._wrap is None):
            return self._complete(self.encode(text, special, block_size, seed))
        plan = self.plan(text)
        if plan.exact:
            return self._complete(self.finish(plan, special, block_size, seed))
        wrap = self._wrap if special and self._wrap is not None else ([], [])
        ids, keys, chars = list(wrap[0]), [], 0
        if plan.entry is not None and plan.keep:
            ids += plan.entry.ids[:plan.keep]
            keys, chars = _reused_keys(plan.entry, ids, block_size, seed, len(wrap[0])), plan.start
            if not all(held(k) for k in keys):
                return _partial(ids, keys, text, chars, wrap)
        end = chars + LAZY_STEP_CHARS
        while (end := _word_end(text, end)) < len(text) - LAZY_STEP_CHARS // 2:
            piece = self.plan(text[:end])
            entry, _ = self._entry(piece)
            self.cache.insert(piece, entry)
            c = entry.cuts
            i = bisect.bisect_right(c.end_chars, end - MARGIN) - 1
            if i >= 0 and c.tokens[i] + len(wrap[0]) > len(ids) and text[c.chars[i]].isascii():
                ids, chars, checked = wrap[0] + entry.ids[:c.tokens[i]], c.chars[i], len(keys)
                new = ids[len(keys) * block_size:len(ids) // block_size * block_size]
                keys += _block_keys(new, block_size, keys[-1] if keys else seed) if new else []
                if not all(held(k) for k in keys[checked:]):
                    return _partial(ids, keys, text, chars, wrap)
            end += LAZY_STEP_CHARS
        return self._complete(self.encode(text, special, block_size, seed))

    @staticmethod
    def _complete(e: Encoded) -> Partial:
        return Partial(e.ids, e.keys or [], len(e.ids), True)

    def plan(self, text: str) -> Plan:
        """The cheap part of :meth:`encode`: how much of ``text`` a cached prefix covers (``work_chars`` is
        what is left to encode).  Pass the plan to :meth:`finish`, on any thread."""
        return self.cache.plan(text) if self.cache is not None else Plan(text, [])

    def finish(self, plan: Plan, special: bool, block_size: int | None = None, seed: int = 0) -> Encoded:
        if special and self._wrap is None:  # an unusual post-processor: let it do everything
            ids = _ids(self.tok.encode_batch([plan.text], add_special_tokens=True)[0])
            return Encoded(ids, _block_keys(ids, block_size, seed) if block_size else None, 0)
        head, tail = self._wrap if special and self._wrap is not None else ([], [])
        entry, reused = self._entry(plan)
        ids = head + entry.ids + tail if head or tail else entry.ids
        keys = self._keys(plan, entry, ids, reused + len(head), block_size, seed, (len(head), len(tail)))
        if self.cache is not None and not plan.exact:
            self.cache.insert(plan, entry)
        return Encoded(ids, keys, reused)

    def _entry(self, plan: Plan) -> tuple[Entry, int]:
        """The cache entry for the plan's text (ids without special tokens) and how many ids were reused."""
        if plan.exact and plan.entry is not None:
            return plan.entry, len(plan.entry.ids)
        text, prev = plan.text, plan.entry
        if prev is not None:
            enc = self.tok.encode_batch([text[plan.start:]], add_special_tokens=False)[0]
            suffix = _ids(enc)
            if suffix[:len(plan.overlap)] == plan.overlap:
                cuts = Cuts()
                cuts.extend(prev.cuts, plan.keep)
                if self.cache is not None:
                    cut_points(cuts, enc.word_ids, plan.keep, plan.start, _starts(enc))
                return Entry(text, prev.ids[:plan.keep] + suffix, cuts, plan.anchors), plan.keep
            log.info("prefix reuse failed its overlap check; encoding in full")
        enc = self.tok.encode_batch([text], add_special_tokens=False)[0]
        cuts = Cuts()
        if self.cache is not None:
            cut_points(cuts, enc.word_ids, 0, 0, _starts(enc))
        return Entry(text, _ids(enc), cuts, plan.anchors), 0

    def _keys(self, plan: Plan, entry: Entry, ids: list[int], reused: int, block_size: int | None, seed: int,
              wrap: tuple[int, int]) -> list[int] | None:
        """Block keys of ``ids``; those of the reused prefix come from the cached entry's keys."""
        if not block_size:
            return None
        params = (block_size, seed, *wrap)
        prev = plan.entry.keyed if plan.entry is not None else None
        n = 0
        if prev is not None and prev[0][:3] == params[:3]:
            n = min(reused // block_size, len(prev[1]))
            if plan.exact and prev[0] == params:
                return prev[1]
        if n:
            old = prev[1] if prev is not None else []
            keys = old[:n] + _block_keys(ids[n * block_size:], block_size, old[n - 1])
        else:
            keys = _block_keys(ids, block_size, seed)
        entry.keyed = (params, keys)
        return keys


def _reused_keys(entry: Entry, ids: list[int], block_size: int, seed: int, head: int) -> list[int]:
    """Keys of the whole blocks of ``ids`` (the wrap's head + a cached entry's leading ids): the entry's own
    keys when they were cut the same way, else hashed now."""
    n = len(ids) // block_size
    if entry.keyed is not None and entry.keyed[0][:3] == (block_size, seed, head) and len(entry.keyed[1]) >= n:
        return entry.keyed[1][:n]
    return _block_keys(ids[:n * block_size], block_size, seed)


def _partial(ids: list[int], keys: list[int], text: str, chars: int, wrap: tuple[list[int], list[int]]) -> Partial:
    """``ids`` cover ``text[:chars]``; the rest's tokens are estimated at the same characters per token."""
    body = len(ids) - len(wrap[0])
    rest = round(body * (len(text) - chars) / chars) if chars else len(text) // 4
    return Partial(ids, keys, len(ids) + rest + len(wrap[1]), False)


def _word_end(text: str, at: int) -> int:
    """The first whitespace at or after ``at`` (a piece ends between words), or the text's length."""
    n = len(text)
    while at < n and not text[at].isspace():
        at += 1
    return min(at, n)


def _block_keys(ids: list[int], block_size: int, seed: int) -> list[int]:
    return cast("list[int]", block_keys(ids, block_size, seed))  # BlockKey is an int


def _starts(enc: Any) -> Callable[[int], int]:
    def start(k: int) -> int:
        span: tuple[int, int] = enc.token_to_chars(k)
        return span[0]

    return start


def _ids(enc: Any) -> list[int]:
    ids: list[int] = enc.ids
    return ids


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
