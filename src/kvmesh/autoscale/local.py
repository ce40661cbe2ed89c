"""The local actuator: ``kvmesh up --autoscale`` starts and stops engine replicas on this machine.

:class:`LocalAutoscaler` runs the decision core (:class:`~kvmesh.autoscale.core.Scaler`) every
``interval_s`` over signals it gathers from the gateway (every served request, through
``Gateway.observers``; the overload pressure; the engines' scraped gauges) and applies the counts through
:class:`LocalActuator`, which talks to the engine supervisor and the gateway's backend pool:

- **scale-out** starts a replica (``Supervisor.add``: started and watched like the others), waits until it
  is ready, **pre-warms** it, then adds it to the pool with a **ramped share**: for ``ramp_s`` it takes a new
  request only while its in-flight count is below ``ramp_share(age) ×`` the others' mean (at least one).
  Pre-warm replays the hottest prompt prefixes the gateway served (:class:`~kvmesh.autoscale.cacheaware.
  Hotness` over their block keys, :func:`~kvmesh.autoscale.cacheaware.prewarm_plan` for the chains) to the
  new replica directly, as ``max_tokens=1`` completions of their token ids, before it is in the pool: a
  vLLM replica with kvmesh's connector loads those blocks from the cache node instead of computing them; a
  simulated engine computes them into its prefix cache.  Either way its first routed requests sharing a
  hot prefix find it cached.  (Pre-warm needs token ids: a KV-aware routing policy.)  Each prompt is replayed
  with its tenant's ``cache_salt``: the blocks warmed are the tenant's own, those its requests will look up.
- **scale-in** cancels replicas still starting first, then drains the victims the core chose (the
  cache-aware chooser: least valuable cache first): the backend is marked ``draining`` (no new request;
  in-flight ones, streams included, run to their end), the actuator waits until it has none in flight (at
  most ``drain_timeout_s``, then stops it anyway and says so), removes it from the pool and the index, and
  stops the engine (``Supervisor.remove``: no restart).
- **signals**: each served request counts in the interval it ends in — its TTFT, its TPOT (streams) and
  whether it missed the policy's SLO targets (``slo``'s ``ttft_s`` / ``tpot_s``, :func:`slo_targets`), which
  feed ``slo``'s miss-feedback floor as in the simulator.
- **policy**: one of :mod:`kvmesh.autoscale.policies`' registry with its published defaults;
  ``LocalConfig.tuning`` overrides fields of its config (shorter windows for a demo, a bench or a test).
- **scale to zero** (``min_replicas = 0``): the gateway holds requests while no replica is ready
  (``[gateway] cold_start_hold_s``); a held request wakes the autoscaler, which starts one at once.

This module imports no other kvmesh package but the index's key hashing (the stack hands it the supervisor,
the gateway and an engine factory), so the autoscale package stays below the engines, the simulator and the
gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvmesh.autoscale.cacheaware import CacheAwareVictims, Hotness, prewarm_plan, ramp_share
from kvmesh.autoscale.core import Capacity, Policy, Scaler, ScalerConfig
from kvmesh.autoscale.policies import HpaPolicy, make_policy
from kvmesh.autoscale.signals import AGGREGATED, EngineSignals, GatewaySignals, RoleSignals, Signals
from kvmesh.index.hashing import block_keys

log = logging.getLogger("kvmesh.autoscale")
_DRAIN_POLL_S = 0.05
_UNKEYED_MAX = 1024  # prompts kept while the block size is unknown (a fresh stack's first minute at most)
_PROBES = 40  # pre-warm: fresh-block requests sent until the index hears the new replica's KV events


@dataclass(frozen=True, slots=True)
class LocalConfig:
    policy: str = "slo"
    min_replicas: int = 1
    max_replicas: int = 4
    interval_s: float = 5.0
    start_s: float = 15.0          # the cold start the policies assume (model load)
    drain_timeout_s: float = 600.0
    ramp_s: float = 30.0
    prewarm_prompts: int = 16      # hottest chains replayed to a new replica
    prewarm_blocks: int = 1024
    capacity: Capacity = field(default_factory=lambda: Capacity(prefill_tps=2000.0, decode_concurrency=8.0))
    # fields of the policy's own config (SloConfig, HpaConfig, KpaConfig, DynamoConfig) over its published
    # defaults: e.g. {"period_s": 1, "scale_down_window_s": 10} shortens the windows for a demo or a test
    tuning: Mapping[str, float] = field(default_factory=dict)


def parse_tuning(items: Sequence[str]) -> dict[str, float]:
    """``NAME=VALUE`` settings (``kvmesh up --autoscale-set``) as ``LocalConfig.tuning``; ``ValueError`` for
    one that is not a name and a number.  Whether the policy has the setting is checked by ``tuned_policy``."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ValueError(f"--autoscale-set {item!r}: expected NAME=NUMBER, e.g. scale_down_window_s=300")
    return out


def tuned_policy(cfg: LocalConfig) -> Policy:
    """``cfg.policy`` with its published defaults, then ``cfg.tuning`` over its config (``ValueError`` for a
    field the policy does not have)."""
    p = make_policy(cfg.policy, cfg.capacity, start_s=cfg.start_s)
    if not cfg.tuning:
        return p
    pcfg = getattr(p, "cfg", None)
    names = {f.name for f in dataclasses.fields(pcfg)} if dataclasses.is_dataclass(pcfg) else set()
    if unknown := sorted(set(cfg.tuning) - names):
        raise ValueError(f"policy {cfg.policy!r} has no setting {', '.join(unknown)}; it has "
                         f"{', '.join(sorted(names)) or 'none'}")
    new = dataclasses.replace(pcfg, **cfg.tuning)  # type: ignore[type-var]
    if isinstance(p, HpaPolicy):  # queue is an HPA on the waiting count: keep its class and name
        HpaPolicy.__init__(p, new)
        return p
    return type(p)(new)  # type: ignore[call-arg]


def slo_targets(policy: Policy) -> tuple[float, float] | None:
    """The (TTFT, TPOT) targets the gateway's misses are counted against: the policy's own (``slo``, as
    tuned by ``--autoscale-set ttft_s=... tpot_s=...``); None for a policy with no SLO (its miss counts stay
    0, as the signals' contract says for an actuator that knows no target)."""
    cfg = getattr(policy, "cfg", None)
    ttft, tpot = getattr(cfg, "ttft_s", None), getattr(cfg, "tpot_s", None)
    return (float(ttft), float(tpot)) if isinstance(ttft, float | int) and isinstance(tpot, float | int) else None


class _Engine(Protocol):
    name: str
    url: str


class _Supervisor(Protocol):
    async def add(self, engine: Any) -> None: ...
    async def remove(self, name: str) -> None: ...


Factory = Callable[[int], tuple[_Engine, str | None]]  # replica index -> (engine, its KV-event endpoint)


class LocalActuator:
    """:class:`~kvmesh.autoscale.core.Actuator` over the local supervisor and the gateway's pool (one
    role: aggregated).  ``scale`` is synchronous and level-triggered; the work runs in tasks."""

    def __init__(self, gw: Any, supervisor: _Supervisor, factory: Factory, serving: Sequence[str],
                 cfg: LocalConfig, prewarm: Callable[[_Engine], Any]) -> None:
        self.gw, self.supervisor, self.factory, self.cfg, self.prewarm = gw, supervisor, factory, cfg, prewarm
        self.serving: dict[str, float] = dict.fromkeys(serving, -1e9)  # name -> serving since (monotonic)
        self.starting: dict[str, asyncio.Task[None]] = {}
        self.draining: dict[str, asyncio.Task[None]] = {}
        self.events: list[dict[str, Any]] = []  # what happened, for /debug/autoscale and tests

    def replicas(self, role: str) -> int:
        return len(self.serving) + len(self.starting)

    def ready(self, role: str) -> int:
        # a crashed one (down through the supervisor's restart backoff and cold start) exists but serves not
        return sum(1 for n in self.serving if (b := self.gw.pool.get(n)) is not None and b.up)

    def members(self, role: str) -> list[str]:
        return list(self.serving)

    def scale(self, role: str, n: int, victims: Sequence[str] = ()) -> None:
        have = self.replicas(role)
        for _ in range(n - have):
            name = self._free_name()
            self.starting[name] = asyncio.create_task(self._start(name), name=f"scale-out-{name}")
        k = have - n
        for name in list(reversed(self.starting))[:max(k, 0)]:  # cancel the youngest starting ones first
            # its name (and port) stay taken, as a draining one's, until its task has stopped it
            task = self.draining[name] = self.starting.pop(name)
            task.cancel()
            k -= 1
        order = [v for v in victims if v in self.serving] + [m for m in reversed(self.serving) if m not in victims]
        for name in order[:max(k, 0)]:
            del self.serving[name]
            self.draining[name] = asyncio.create_task(self._drain(name), name=f"drain-{name}")

    def _free_name(self) -> str:
        used = {*self.serving, *self.starting, *self.draining}
        return next(f"engine-{i}" for i in range(len(used) + 1) if f"engine-{i}" not in used)

    def _note(self, kind: str, name: str, **kw: Any) -> None:
        self.events.append({"t": time.time(), "event": kind, "replica": name, **kw})
        del self.events[:-200]
        log.info("autoscale: %s %s %s", kind, name, kw or "")

    async def _start(self, name: str) -> None:
        engine, kv_events = self.factory(int(name.rsplit("-", 1)[1]))
        self._note("starting", name)
        b, added = None, False
        try:
            await self.supervisor.add(engine)  # stops the engine itself when it fails or is cancelled
            added = True
            # in the pool (health-checked, its KV events followed, so the index learns what the pre-warm
            # puts in its cache) but closed to requests until it is warm
            b = self.gw.pool.add(name, engine.url, kv_events)
            b.ramp = _closed
            self.gw.subscribe(b)
            warmed = await self.prewarm(engine)
        except BaseException as e:
            if b is not None:
                self._forget(name)
            if added:  # failed past add: the supervisor would keep (and restart) a replica nobody serves
                await self.supervisor.remove(name)
            self.starting.pop(name, None)
            self.draining.pop(name, None)  # stopped: its name is free again
            if isinstance(e, asyncio.CancelledError):
                self._note("cancelled", name)
                raise
            if not isinstance(e, Exception):
                raise
            self._note("start_failed", name, error=str(e))
            return
        b.up = True  # it just answered; the next health round confirms
        since = time.monotonic()
        b.ramp = lambda b: self._ramp_admits(b, since)
        self.starting.pop(name, None)
        self.serving[name] = since
        self.gw.admission.pump()  # held requests (scale from zero) go on
        self._note("serving", name, prewarmed_prompts=warmed)

    def _forget(self, name: str) -> None:
        """Out of the pool, the KV-event feed and the index."""
        self.gw.pool.remove(name)
        self.gw.metrics.forget_backend(name, self.gw.policy.name)
        if self.gw.feed is not None:
            self.gw.feed.remove(name)
        if self.gw.index is not None:
            self.gw.index.forget_engine(name)  # its bit freed: a later replica may take the name again

    def _ramp_admits(self, b: Any, since: float) -> bool:
        share = ramp_share(time.monotonic() - since, self.cfg.ramp_s)
        if share >= 1.0:
            b.ramp = None
            return True
        others = [o.in_flight for o in self.gw.pool.backends if o is not b and o.up and not o.draining]
        fair = sum(others) / len(others) if others else 0.0
        return bool(b.in_flight < max(1.0, share * fair))

    async def _drain(self, name: str) -> None:
        b = self.gw.pool.get(name)
        left = 0
        if b is not None:
            b.draining = True
            self._note("draining", name, in_flight=b.in_flight)
            deadline = time.monotonic() + self.cfg.drain_timeout_s
            # polled: the request path keeps no per-backend event, and this is the control plane
            while b.in_flight and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(_DRAIN_POLL_S)
            left = b.in_flight
            self._forget(name)  # its GPU cache goes with it (hot blocks stay in the node)
        if left:
            log.warning("autoscale: %s still had %d requests after %.0fs of draining; stopping it", name, left,
                        self.cfg.drain_timeout_s)
        await self.supervisor.remove(name)
        self.draining.pop(name, None)
        self._note("stopped", name, cut=left)

    async def close(self) -> None:
        for t in [*self.starting.values(), *self.draining.values()]:
            if not t.cancelling():  # a cancelled start is stopping its engine: cut short, it would leak it
                t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t


def _closed(b: Any) -> bool:
    return False


class _Window:
    """What the gateway served since the last tick (reset every tick)."""

    def __init__(self) -> None:
        self.arrivals = self.prompt = self.output = 0
        self.missed_ttft = self.missed_tpot = 0
        self.ttfts: list[float] = []
        self.tpots: list[float] = []

    def served(self, req: Any, end: float, targets: tuple[float, float] | None) -> None:
        """One finished request's latencies (``end``: when its response ended, ``perf_counter``), and whether
        it missed ``targets`` (TTFT, TPOT; None: none known, no miss counted).  TPOT is the gateway's own
        figure (``kvmesh.gateway.proxy``): the time after the first event over the events between the first
        and the closing ``[DONE]``.  A whole (non-streamed) answer has no first token the gateway sees: it
        is counted as finished and never as a miss."""
        if not req.chunks:
            return
        ttft = req.t_first - req.t_arrival
        self.ttfts.append(ttft)
        tpot = (end - req.t_first) / (req.chunks - 2) if req.chunks > 2 else 0.0
        if req.chunks > 2:
            self.tpots.append(tpot)
        if targets is not None:
            self.missed_ttft += ttft > targets[0]
            self.missed_tpot += tpot > targets[1]


def _pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0


class LocalAutoscaler:
    """The control loop of ``kvmesh up --autoscale``: signals → Scaler → :class:`LocalActuator`."""

    def __init__(self, gw: Any, supervisor: _Supervisor, factory: Factory, serving: Sequence[str],
                 cfg: LocalConfig) -> None:
        self.gw, self.cfg = gw, cfg
        self.hot = Hotness(half_life_s=300.0)
        # last block key of a prompt's chain -> its token ids and its tenant's cache salt (the key is salted)
        self.prompts: dict[int, tuple[list[int], str | None]] = {}
        # prompts served before any KV event told the router the block size (so they have no keys yet):
        # keyed at the next pre-warm, else a fresh stack's first (often hottest) prompts would warm nothing
        self.unkeyed: list[tuple[list[int], str | None]] = []
        self.actuator = LocalActuator(gw, supervisor, factory, serving, cfg, self._prewarm)
        index = gw.index
        victims = CacheAwareVictims(lambda e: index.engine_keys(e) if index is not None else set(),
                                    lambda: self.hot.snapshot(time.monotonic()),
                                    lambda e: b.in_flight if (b := gw.pool.get(e)) is not None else 0)
        policy = tuned_policy(cfg)
        self.targets = slo_targets(policy)
        self.scaler = Scaler(policy, self.actuator, ScalerConfig(cfg.min_replicas, cfg.max_replicas,
                                                                 interval_s=cfg.interval_s, start_s=cfg.start_s),
                             victims=victims, held=lambda role: int(gw.admission.holding))
        self.window = _Window()
        self.shed_seen = 0
        self.last_signals: Signals | None = None
        self._task: asyncio.Task[None] | None = None
        gw.observers.append(self.observe)
        gw.autoscale_state = self.snapshot
        gw.admission.on_hold = self.wake

    def observe(self, req: Any) -> None:
        """One served request (``ProxyRequest``): the interval's counts and the hot prefixes."""
        w, ctx = self.window, req.route
        w.arrivals += 1
        w.prompt += ctx.prompt_tokens_estimate
        w.output += max(req.chunks - 1, 0)
        w.served(req, time.perf_counter(), self.targets)
        if not ctx.token_ids:
            return
        salt = req.tenant.salt if req.tenant is not None else None
        if ctx.block_keys:
            self._remember(list(ctx.block_keys), list(ctx.token_ids), salt)
        elif len(self.unkeyed) < _UNKEYED_MAX:
            self.unkeyed.append((list(ctx.token_ids), salt))

    def _remember(self, keys: Sequence[int], ids: list[int], salt: str | None) -> None:
        self.hot.touch(keys, time.monotonic())
        if len(self.prompts) < 100_000:
            self.prompts[keys[-1]] = (ids, salt)

    def _key_unkeyed(self) -> None:
        """Cut the keys of the prompts served before the block size was known, now that it is."""
        pending, self.unkeyed = self.unkeyed, []
        for ids, salt in pending:
            spec = self.gw.policy.key_spec(salt)
            if spec is not None and (keys := list(block_keys(ids, spec[0], spec[1]))):
                self._remember(keys, ids, salt)

    def signals(self) -> Signals:
        w, self.window = self.window, _Window()
        shed = sum(self.gw.pressure.shed.values())
        backends = [b for b in self.gw.pool.backends if b.name in self.actuator.serving]
        g = GatewaySignals(interval_s=self.cfg.interval_s, arrivals=w.arrivals, prompt_tokens=w.prompt,
                           prefill_tokens_done=w.prompt, output_tokens=w.output, finished=w.arrivals,
                           queued_prefill_tokens=self.gw.pressure.queued_prefill_tokens(),
                           in_flight=sum(b.in_flight for b in backends), ttft_p50_s=_pct(w.ttfts, 0.5),
                           ttft_p90_s=_pct(w.ttfts, 0.9), tpot_p50_s=_pct(w.tpots, 0.5),
                           tpot_p90_s=_pct(w.tpots, 0.9), shed=shed - self.shed_seen,
                           slo_missed_ttft=w.missed_ttft, slo_missed_tpot=w.missed_tpot)
        self.shed_seen = shed
        engines = tuple(EngineSignals(b.name, max(b.engine_queue - b.running, 0), max(b.running, b.in_flight),
                                      max(b.kv_usage, 0.0)) for b in backends)
        return Signals(time.monotonic(), {AGGREGATED: RoleSignals(g, engines)})

    def tick(self) -> None:
        self.last_signals = self.signals()
        self.scaler.tick(self.last_signals)

    def wake(self) -> None:
        """A request is held with no replica ready (scale to zero): start one now, not at the next tick."""
        self.scaler.wake(AGGREGATED, time.monotonic())

    async def _prewarm(self, engine: _Engine) -> int:
        spec = self.gw.policy.key_spec(None)
        if spec is None:  # no KV event heard yet: nothing can be keyed, nor checked on the new replica
            log.warning("autoscale: not pre-warming %s: the block size is not known yet (no KV event heard)",
                        engine.name)
            return 0
        self._key_unkeyed()
        if not self.prompts:
            return 0
        plan = prewarm_plan(self.hot.snapshot(time.monotonic()), self.hot.parent, self.cfg.prewarm_blocks)
        parents = {self.hot.parent.get(k) for k in plan}
        leaves = [k for k in plan if k not in parents and k in self.prompts][:self.cfg.prewarm_prompts]
        if not leaves:  # say why it warms nothing (a load-sensitive test once saw 0 and could not tell)
            log.warning("autoscale: nothing to pre-warm %s with: %d hot keys, %d planned, none with a prompt",
                        engine.name, len(self.hot.parent), len(plan))
            return 0
        if not await self._events_live(engine, spec[0]):
            return 0
        sent = 0
        for key in leaves:
            ids, salt = self.prompts[key]
            body: dict[str, Any] = {"prompt": ids}
            if salt is not None:  # the tenant's own blocks: unsalted, they would warm nobody's cache
                body["cache_salt"] = salt
            sent += await self._complete1(engine, body)
        return sent

    async def _complete1(self, engine: _Engine, body: dict[str, Any]) -> bool:
        """A ``max_tokens=1`` completion straight to ``engine``; False (logged) when it fails."""
        model = next(iter(self.gw.pool.known_models()), None)
        try:
            async with self.gw.http.post(f"{engine.url}/v1/completions",
                                         json={"model": model, "max_tokens": 1, **body}) as r:
                return bool(r.status == 200)
        except Exception as e:  # a failed pre-warm costs a cold cache, never the replica
            log.warning("autoscale: pre-warm request to %s failed: %s", engine.name, e)
            return False

    async def _events_live(self, engine: _Engine, block_size: int) -> bool:
        """Whether the index hears ``engine``'s KV events yet.  A ZMQ subscriber misses what the engine
        publishes before its subscription reaches it (and a simulated engine keeps no replay buffer), so the
        pre-warm would warm a cache the router does not know of: send 1-token probes of a fresh block until
        the index holds one (at most ``_PROBES``)."""
        index = self.gw.index
        if index is None:
            return False
        for i in range(_PROBES):
            if index.engine_keys(engine.name):
                return True
            base = 1000 + (time.monotonic_ns() // 1000 + 97 * i) % 3000  # a block no prompt holds (ids < 4200)
            await self._complete1(engine, {"prompt": [base + j for j in range(block_size + 1)]})
            await asyncio.sleep(_DRAIN_POLL_S)  # the event travels engine -> socket -> index
        log.warning("autoscale: no KV event from %s after %d probes; pre-warming it anyway", engine.name, _PROBES)
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.interval_s)
            try:
                self.tick()
            except Exception:
                log.exception("autoscale tick failed")

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="autoscale")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.actuator.close()

    def snapshot(self) -> dict[str, Any]:
        a = self.actuator
        return {"enabled": True, **self.scaler.snapshot(), "serving": list(a.serving),
                "starting": list(a.starting), "draining": list(a.draining), "events": a.events[-50:],
                "last_signals": self.last_signals.to_dict() if self.last_signals is not None else None}
