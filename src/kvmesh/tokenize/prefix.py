"""Exact reuse of an already-tokenised prefix: encode only the new suffix of a text.

Multi-turn chats and agents re-send their history, and a chat template renders that history identically,
so most of a prompt's text is often a prefix of a text encoded moments ago.  The token ids must still equal
a full encode exactly (block keys, and vLLM's own block hashes, are functions of them), so reuse rests on
what a tokenizer guarantees and is checked where it is cheap to check:

- **Splits.**  The pre-tokenizer splits the text into words before the model (BPE, ...) runs, and no token
  crosses a split.  Regex splitters (GPT-2, Llama-3, Qwen) scan left to right and decide each split from
  the text up to one character past it, so a split well inside the common prefix of two texts is a split of
  both, and the ids before it are the same.  Cut points are recorded at word starts (``Encoding.word_ids``)
  every :data:`CUT_EVERY` tokens; a reuse cuts at the last one at least :data:`MARGIN` characters before
  the end of the common prefix.
- **Overlap check.**  The suffix is encoded from a cut one word *earlier* than needed, and its first
  tokens must reproduce the cached tokens of that word; otherwise (a prefix space added, a ``Metaspace``
  prepended at the start of a string, ...) the text is encoded in full.
- **Tokenizers.**  Reuse is only enabled for the components whose behaviour at a cut is understood (see
  :func:`reuse_supported`), and only at cuts before an ASCII character (Unicode normalisers compose only
  with non-ASCII following characters); everything else gets a full encode.

The common prefix is found with chained xxh3 hashes of :data:`CHUNK`-character chunks (a hit is confirmed by
comparing the texts).  The cache is a bounded LRU: at most ``max_entries`` texts and ``max_tokens`` ids.
Block keys of a cached text are kept beside its ids (keys of a prefix are a prefix of the keys), so a hit
also hashes only the new blocks.  All methods are thread-safe (the gateway encodes long prompts on worker
threads); encoding itself happens outside the lock.
"""

from __future__ import annotations

import array
import bisect
import collections
import threading
from dataclasses import dataclass, field
from typing import Any

import xxhash

CHUNK = 64  # characters per anchor hash: the granularity at which a common prefix is found
CUT_EVERY = 16  # tokens between recorded cut points
MARGIN = 8  # characters kept between a cut and the end of the common prefix

_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase"}
_PRE_TOKENIZERS = {"ByteLevel", "Split", "Whitespace", "WhitespaceSplit", "Punctuation", "Digits"}
_MODELS = {"BPE", "WordPiece", "WordLevel", "Unigram"}


def reuse_supported(cfg: dict[str, Any]) -> bool:
    """Whether a tokenizer (its ``tokenizer.json``) splits text so that prefix reuse is exact."""
    if cfg.get("truncation") or cfg.get("padding"):
        return False
    if any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in cfg.get("added_tokens") or []):
        return False
    model = cfg.get("model") or {}
    if model.get("type") not in _MODELS or model.get("dropout"):
        return False
    return _component_ok(cfg.get("normalizer"), _NORMALIZERS, "normalizers") and \
        cfg.get("pre_tokenizer") is not None and _component_ok(cfg["pre_tokenizer"], _PRE_TOKENIZERS, "pretokenizers")


def _component_ok(c: dict[str, Any] | None, allowed: set[str], seq_key: str) -> bool:
    if c is None:
        return True
    if c.get("type") == "Sequence":
        return all(_component_ok(x, allowed, seq_key) for x in c.get(seq_key) or [])
    if c.get("type") == "ByteLevel" and c.get("add_prefix_space"):
        return False  # a suffix encoded alone would gain a space
    return c.get("type") in allowed


def anchors(text: str) -> list[int]:
    """Chained hashes of ``text[:CHUNK]``, ``text[:2 * CHUNK]``, ... (whole chunks only)."""
    out: list[int] = []
    h = 0
    digest = xxhash.xxh3_64_intdigest
    for i in range(0, len(text) - CHUNK + 1, CHUNK):
        h = digest(text[i:i + CHUNK].encode("utf-8", "surrogatepass"), h)
        out.append(h)
    return out


@dataclass(slots=True)
class Cuts:
    """Cut points, ascending: cut i restarts at word start ``chars[i]`` (token ``tokens[i]``) and the next
    word starts at ``end_chars[i]`` (token ``end_tokens[i]``); that one word is the overlap to check."""

    chars: array.array[int] = field(default_factory=lambda: array.array("q"))
    tokens: array.array[int] = field(default_factory=lambda: array.array("q"))
    end_chars: array.array[int] = field(default_factory=lambda: array.array("q"))
    end_tokens: array.array[int] = field(default_factory=lambda: array.array("q"))

    def add(self, char: int, token: int, end_char: int, end_token: int) -> None:
        self.chars.append(char)
        self.tokens.append(token)
        self.end_chars.append(end_char)
        self.end_tokens.append(end_token)

    def extend(self, other: Cuts, upto: int) -> None:
        """Append ``other``'s cuts whose overlap ends at or before token ``upto``."""
        n = bisect.bisect_right(other.end_tokens, upto)
        self.chars.extend(other.chars[:n])
        self.tokens.extend(other.tokens[:n])
        self.end_chars.extend(other.end_chars[:n])
        self.end_tokens.extend(other.end_tokens[:n])


@dataclass(slots=True)
class Entry:
    text: str
    ids: list[int]  # without special tokens
    cuts: Cuts
    anchors: list[int]
    # ((block size, seed, head length, tail length), block keys of head + ids + tail): one attribute, so
    # threads replace it atomically
    keyed: tuple[tuple[int, int, int, int], list[int]] | None = None


@dataclass(slots=True)
class Plan:
    """What :meth:`PrefixCache.plan` found for a text: encode ``text[start:]`` and keep ``entry.ids[:keep]``."""

    text: str
    anchors: list[int]
    entry: Entry | None = None
    exact: bool = False
    start: int = 0  # characters already covered by the reused ids (a cut point), minus the overlap
    keep: int = 0  # reused tokens before ``start``
    overlap: list[int] = field(default_factory=list)  # cached ids the suffix encode must begin with

    @property
    def work_chars(self) -> int:
        return 0 if self.exact else len(self.text) - self.start


class PrefixCache:
    def __init__(self, max_entries: int = 4096, max_tokens: int = 1 << 20) -> None:
        self.max_entries = max_entries
        self.max_tokens = max_tokens
        self._entries: collections.OrderedDict[int, Entry] = collections.OrderedDict()
        self._by_anchor: dict[int, Entry] = {}
        self._tokens = 0
        self._lock = threading.Lock()

    def plan(self, text: str) -> Plan:
        """Find the cached text sharing the longest prefix with ``text`` and where to cut it."""
        a = anchors(text)
        plan = Plan(text, a)
        with self._lock:
            exact = self._entries.get(_full_key(text, a))
            if exact is not None and exact.text == text:
                self._entries.move_to_end(_full_key(text, a))
                plan.entry, plan.exact = exact, True
                return plan
            best: Entry | None = None
            n = 0
            for h in a:
                e = self._by_anchor.get(h)
                if e is None:
                    break
                best, n = e, n + 1
        if best is None:
            return plan
        common = n * CHUNK
        if best.text[:common] != text[:common]:  # a hash collision or a stale anchor: no reuse
            return plan
        c = best.cuts
        i = bisect.bisect_right(c.end_chars, common - MARGIN) - 1
        if i < 0 or not text[c.chars[i]].isascii():
            return plan
        plan.entry, plan.start, plan.keep = best, c.chars[i], c.tokens[i]
        plan.overlap = best.ids[c.tokens[i]:c.end_tokens[i]]
        return plan

    def insert(self, plan: Plan, entry: Entry) -> None:
        key = _full_key(plan.text, plan.anchors)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._tokens -= len(old.ids)
            self._entries[key] = entry
            self._tokens += len(entry.ids)
            for h in entry.anchors:
                self._by_anchor[h] = entry
            while self._entries and (len(self._entries) > self.max_entries or self._tokens > self.max_tokens):
                _, gone = self._entries.popitem(last=False)
                self._tokens -= len(gone.ids)
                for h in gone.anchors:
                    if self._by_anchor.get(h) is gone:
                        del self._by_anchor[h]

    def __len__(self) -> int:
        return len(self._entries)


def _full_key(text: str, a: list[int]) -> int:
    # the anchors cover whole chunks; the tail and the length make the key specific to this text
    tail = text[len(a) * CHUNK:].encode("utf-8", "surrogatepass")
    return xxhash.xxh3_64_intdigest(tail, a[-1] if a else 0) ^ len(text)


def cut_points(cuts: Cuts, word_ids: list[int | None], start_token: int, start_char: int,
               token_start: Any) -> None:
    """Append word starts about every :data:`CUT_EVERY` tokens of an encoding to ``cuts``, shifted by
    ``start_char``/``start_token`` (where the encoded text begins in the whole text).

    ``token_start(k)`` is the character where token ``k`` begins.  Tokens outside words (added tokens) are
    never cut at."""
    n = len(word_ids)
    k = 1
    while k < n:
        w = word_ids[k]
        if w is None or word_ids[k - 1] is None or w == word_ids[k - 1]:
            k += 1
            continue
        end = k + 1
        while end < n and word_ids[end] == w:
            end += 1
        if end < n and word_ids[end] is not None:
            cuts.add(start_char + token_start(k), start_token + k, start_char + token_start(end), start_token + end)
        k = max(end, k + CUT_EVERY)
