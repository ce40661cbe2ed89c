"""The gateway's view of its engines: health, in-flight counts and the models each one serves.

Backends come from a static URL list or from the engine supervisor.  A background task checks every
backend's ``/health`` (and refreshes ``/v1/models``) at an interval; a connect failure seen while proxying,
or a supervisor notice, takes a backend out of rotation at once, and the next passing check brings it back.
All state is touched only from the gateway's event loop, so it needs no locks.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp

log = logging.getLogger(__name__)
T = TypeVar("T")


# vLLM v1's gauges (vllm/v1/metrics/loggers.py); the simulated engine exposes the same names.  Summed over
# label sets: one engine process may report several engine indexes (data parallel).
_GAUGE_RE = re.compile(rb"^vllm:(num_requests_running|num_requests_waiting|kv_cache_usage_perc)\{[^}]*\} "
                       rb"([0-9.e+-]+)$", re.M)
# Token counters: when either moves between two scrapes, the engine computed something (progress).
_WORK_RE = re.compile(rb"^vllm:(?:prompt_tokens|generation_tokens)_total\{[^}]*\} ([0-9.e+-]+)$", re.M)
METRICS_FRESH_S = 5.0  # older scrapes are not trusted (the engine may have died or hung)


def engine_work(text: bytes) -> float:
    """Prompt + generated tokens an engine reports having processed (its counters; 0 when absent)."""
    return sum(float(v) for v in _WORK_RE.findall(text))


def parse_engine_metrics(text: bytes) -> tuple[int, int, float]:
    """(running, waiting, KV-cache usage 0-1, -1 when absent) from an engine's Prometheus text."""
    got: dict[bytes, list[float]] = {}
    for name, value in _GAUGE_RE.findall(text):
        got.setdefault(name, []).append(float(value))
    usage = got.get(b"kv_cache_usage_perc")
    return (int(sum(got.get(b"num_requests_running", ()))), int(sum(got.get(b"num_requests_waiting", ()))),
            max(usage) if usage else -1.0)


@dataclass(slots=True)
class CircuitBreaker:
    """Per-backend breaker for failures a request saw (connect refused, no first token in time, broken
    response): closed → open for a cooldown → half-open, when ONE real request probes the backend →
    closed on its success, or open again with twice the cooldown (up to ``max_s``).  Health checks cannot
    close it: a hung engine often still answers ``/health``.  Touched only on the gateway's loop."""

    base_s: float = 1.0
    max_s: float = 30.0
    state: str = "closed"  # closed | open (half-open = open, cooldown over, a probe allowed or in flight)
    cooldown_s: float = 0.0
    opened_at: float = 0.0
    probing: bool = False
    trips: int = 0
    probe_seq: int = 0  # which request is the probe: an older one ending must not free a newer one's slot

    def admits(self, now: float) -> bool:
        if self.state == "closed":
            return True
        return not self.probing and now - self.opened_at >= self.cooldown_s

    def routed(self) -> int:
        """A request is sent: its probe token when it is the half-open probe (no other until it resolves),
        else 0."""
        if self.state == "closed":
            return 0
        self.probing, self.probe_seq = True, self.probe_seq + 1
        return self.probe_seq

    def probe_ended(self, probe: int) -> None:
        """The request :meth:`routed` gave ``probe`` has ended.  A probe that neither succeeded nor failed
        (the client went away, the engine was busy, a timeout) gives its slot back: the breaker stays open
        and the next request probes.  (Else the slot stayed taken and the backend out of rotation for good.)"""
        if probe and self.probing and probe == self.probe_seq:
            self.probing = False

    def failed(self, now: float) -> None:
        if self.state == "closed":
            self.cooldown_s = self.base_s
            self.trips += 1
        elif self.probing:  # the half-open probe failed: back off further
            self.cooldown_s = min(self.cooldown_s * 2, self.max_s)
            self.trips += 1
        # else: another request sent before the breaker opened failed too; same cooldown, from now
        self.state, self.opened_at, self.probing = "open", now, False

    def succeeded(self) -> None:
        self.state, self.cooldown_s, self.probing = "closed", 0.0, False


@dataclass(slots=True)
class Backend:
    name: str
    url: str
    kv_events: str | None = None
    replay: str | None = None
    role: str = "both"  # P/D role: prefill | decode | both (kvmesh.routing.disagg)
    up: bool = False  # health checks / connect results
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    in_flight: int = 0
    pending_prefill_tokens: int = 0
    prefilled_tokens: int = 0  # prefill tokens of requests whose first token came back (cumulative)
    engine_queue_value: int = 0
    engine_running_value: int = 0
    kv_usage_value: float = -1.0
    engine_queue_at: float = 0.0  # when the engine's /metrics were last scraped
    models: frozenset[str] = frozenset()
    model_cards: list[dict[str, Any]] = field(default_factory=list)
    last_error: str = ""
    failures: int = 0
    slow_checks: int = 0
    # Busy is not broken: the last time this engine was seen doing work — a chunk relayed on any of its
    # streams, an answer completed, or its token counters / request gauges moving between scrapes.  A
    # stream's first-token timeout bypasses the engine only when it made no progress (hung, SIGSTOPped).
    progress_at: float = 0.0
    work_seen: tuple[float, int, int] = (-1.0, -1, -1)  # (token counters, running, waiting) last scraped
    # autoscaling (kvmesh.autoscale.local): a draining backend takes no new request (its in-flight ones
    # finish); a ramping one (just added) takes one only while ``ramp()`` says its share allows it
    draining: bool = False
    ramp: Callable[[Backend], bool] | None = None
    # its /tokenize gave the gateway's own ids for the probe text: it may be sent token ids for text
    token_ids_ok: bool = False

    def progressed(self) -> None:
        self.progress_at = time.monotonic()

    def progressed_since(self, t: float) -> bool:
        """Did the engine do any work after monotonic time ``t``?"""
        return self.progress_at > t

    @property
    def healthy(self) -> bool:
        """In rotation: up, not draining, its breaker admits requests (and its ramp, if ramping, one more)."""
        return (self.up and not self.draining and self.breaker.admits(time.monotonic())
                and (self.ramp is None or self.ramp(self)))

    def _fresh(self) -> bool:
        return time.monotonic() - self.engine_queue_at < METRICS_FRESH_S

    @property
    def engine_queue(self) -> int:
        """Running + waiting requests the engine reported within the last 5 s, else -1."""
        return self.engine_queue_value if self._fresh() else -1

    @property
    def running(self) -> int:
        """Running requests the engine reported within the last 5 s, else -1."""
        return self.engine_running_value if self._fresh() else -1

    @property
    def kv_usage(self) -> float:
        """KV-cache usage (0-1) the engine reported within the last 5 s, else -1."""
        return self.kv_usage_value if self._fresh() else -1.0


class FirstByteTimeout(Exception):
    """A backend answered nothing within a window and made no progress meanwhile: hung."""


class EngineBusy(Exception):
    """A backend kept making progress but answered nothing within the whole limit: busy."""


async def wait_progressing(task: asyncio.Future[T], b: Backend, window_s: float, limit_s: float,
                           on_busy_window: Callable[[], None]) -> T:
    """``task``'s result, waiting in windows of ``window_s``: a window in which ``b`` made no progress at all
    (no chunk on any stream, no counted token, its queue still) means hung → :class:`FirstByteTimeout`; one
    in which it made progress means busy → ``on_busy_window()`` and wait on, up to ``limit_s`` in all →
    :class:`EngineBusy`.  Overload is not failure.  The caller cancels ``task`` if it gives up."""
    start = time.monotonic()
    while True:
        window = time.monotonic()
        left = start + limit_s - window
        done, _ = await asyncio.wait({task}, timeout=max(min(window_s, left), 0.0))
        if done:
            return task.result()
        if not b.progressed_since(window):
            raise FirstByteTimeout
        if time.monotonic() - start >= limit_s:
            raise EngineBusy
        on_busy_window()


class BackendPool:
    def __init__(self, interval_s: float = 2.0, on_health: Any = None, scrape_metrics: bool = False,
                 fail_threshold: int = 3) -> None:
        self.backends: list[Backend] = []
        self.fail_threshold = fail_threshold
        self.interval_s = interval_s
        self.scrape_metrics = scrape_metrics
        self._on_health = on_health  # callable(backend) after a health state change
        # (probe text, the gateway's ids for it): checked against each backend's /tokenize when it comes up
        self.tokens_probe: tuple[str, list[int]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def add(self, name: str, url: str, kv_events: str | None = None, replay: str | None = None,
            role: str = "both") -> Backend:
        b = Backend(name, url.rstrip("/"), kv_events, replay, role)
        self.backends.append(b)
        self._wake.set()
        return b

    def remove(self, name: str) -> Backend | None:
        """Take ``name`` out of the pool (requests already on it keep their Backend object and finish)."""
        b = self.get(name)
        if b is not None:
            self.backends.remove(b)
        return b

    def get(self, name: str) -> Backend | None:
        return next((b for b in self.backends if b.name == name), None)

    def set_health(self, b: Backend, healthy: bool, reason: str = "") -> None:
        if b.up != healthy:
            log.log(logging.INFO if healthy else logging.WARNING, "backend %s is now %s%s", b.name,
                    "healthy" if healthy else "unhealthy", f" ({reason})" if reason else "")
        b.up = healthy
        if not healthy:
            b.last_error = reason
            b.failures += 1
        else:
            b.failures = 0
        if self._on_health:
            self._on_health(b, reason)

    async def _scrape(self, http: aiohttp.ClientSession, b: Backend) -> None:
        """The engine's gauges and work counters; a slow or failing /metrics is no health failure (the
        health check judges that): its figures just go stale."""
        try:
            async with http.get(f"{b.url}/metrics") as r:
                if r.status != 200:
                    return
                text = await r.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            log.debug("backend %s: /metrics: %s", b.name, type(e).__name__)
            return
        running, waiting, b.kv_usage_value = parse_engine_metrics(text)
        work = (engine_work(text), running, waiting)
        if b.work_seen[0] >= 0 and work != b.work_seen:
            b.progressed()  # counted tokens or its queue moved since the last scrape
        b.work_seen = work
        b.engine_running_value, b.engine_queue_value = running, running + waiting
        b.engine_queue_at = time.monotonic()

    def known_models(self) -> set[str]:
        return {m for b in self.backends for m in b.models}

    def model_list(self) -> list[dict[str, Any]]:
        seen: dict[str, dict[str, Any]] = {}
        for b in self.backends:
            if b.healthy:
                for card in b.model_cards:
                    seen.setdefault(str(card.get("id")), card)
        return list(seen.values())

    def token_ids_ok(self) -> bool:
        """Whether text prompts may go to the backends as token ids: every backend up tokenises the probe as
        the gateway does."""
        up = [b for b in self.backends if b.up]  # one coming up is checked before it is marked up
        return self.tokens_probe is not None and bool(up) and all(b.token_ids_ok for b in up)

    async def _same_tokens(self, http: aiohttp.ClientSession, b: Backend) -> bool:
        """``b``'s ``/tokenize`` (vLLM's) gives the gateway's ids for the probe; any error: no."""
        if self.tokens_probe is None or not b.models:
            return False
        text, ids = self.tokens_probe
        try:
            async with http.post(f"{b.url}/tokenize", json={"model": min(b.models), "prompt": text}) as r:
                got = (await r.json()).get("tokens") if r.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            got = None
        if got != ids:
            log.info("backend %s: its tokenizer does not match the gateway's (or no /tokenize): text prompts "
                     "are sent to it as text", b.name)
        return got == ids

    async def check(self, http: aiohttp.ClientSession, b: Backend) -> None:
        try:
            async with http.get(f"{b.url}/health") as r:
                ok = r.status == 200
            if ok and (not b.models or not b.up):
                async with http.get(f"{b.url}/v1/models") as r:
                    cards = (await r.json()).get("data", [])
                b.model_cards = [c for c in cards if isinstance(c, dict)]
                b.models = frozenset(str(c.get("id")) for c in b.model_cards)
                b.token_ids_ok = await self._same_tokens(http, b)
            # P/D engines are always scraped: the decode-first decision reads their running counts, and a
            # prefill leg (never streamed) learns that its engine is busy rather than hung only from here.
            if ok and (self.scrape_metrics or b.role != "both"):
                await self._scrape(http, b)
            if ok:
                b.slow_checks = 0
                self.set_health(b, True)
            else:
                self.set_health(b, False, "health check failed")
        except aiohttp.ClientConnectorError:
            self.set_health(b, False, "connect failed (health check)")
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            # A busy engine can be slow to answer /health: only repeated failures take it out of rotation
            # (a refused connection, above, does at once).
            b.slow_checks += 1
            if b.slow_checks >= self.fail_threshold or not b.up:
                self.set_health(b, False, f"health check: {type(e).__name__} x{b.slow_checks}")

    async def check_all(self, http: aiohttp.ClientSession) -> None:
        await asyncio.gather(*(self.check(http, b) for b in self.backends))

    async def run(self, http: aiohttp.ClientSession) -> None:
        """Health-check forever (cancel to stop), the first round one interval after the caller's own
        :meth:`check_all` (the gateway's start).  ``poke()`` triggers an early round, also one that comes
        while a round runs (a backend added meanwhile is checked at once)."""
        self._wake.clear()
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            await self.check_all(http)

    def poke(self) -> None:
        self._wake.set()
