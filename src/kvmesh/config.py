"""Typed configuration: one pydantic model per component, one TOML file for the whole stack.

Unknown keys are errors (``extra="forbid"``) so a typo in a config file fails loudly at start-up instead of
being silently ignored.  Every CLI flag maps onto a field here; the CLI only overrides what was given.
"""

from __future__ import annotations

import pathlib
import tomllib
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from kvmesh.config_errors import first_error as first_error  # re-exported: the CLI words errors with it
from kvmesh.config_pd import PdSettings as PdSettings  # re-exported: the [gateway.pd] table
from kvmesh.policy_names import DEFAULT_POLICY, policy_help, policy_spec

Dtype = Literal["auto", "bfloat16", "float32", "float16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_cpu_list(spec: str) -> set[int]:
    """'0-3,6' -> {0, 1, 2, 3, 6}; ValueError with the offending part otherwise."""
    cpus: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"not a CPU list: {spec!r} (expected e.g. '1' or '0-3,6')") from None
        if a < 0 or b < a:
            raise ValueError(f"not a CPU list: {spec!r} (expected e.g. '1' or '0-3,6')")
        cpus.update(range(a, b + 1))
    return cpus


class _EngineBase(_Strict):
    """What every engine replica has, whatever runs it."""

    model: str = Field(description="Model directory or HF id available locally")
    served_model_name: str | None = Field(default=None, description="Name clients ask for; the model path when unset")
    host: str = "127.0.0.1"
    port: int = Field(default=8100, ge=1, le=65535, description="Engine port (replica i: port + i)")
    kv_events: bool = True
    kv_events_endpoint: str | None = Field(default=None, description="ipc:// endpoint for KV events; derived "
                                           "when unset")

    @field_validator("kv_events_endpoint")
    @classmethod
    def _ipc_only(cls, v: str | None) -> str | None:
        return _ipc_endpoint(v)


def _ipc_endpoint(v: str | None) -> str | None:
    # vLLM *connects* (instead of binding) for tcp://host endpoints, which is wrong for a publisher; tcp://*
    # binds every interface: wrong on a shared host, right in a Kubernetes pod (its own network namespace).
    if v is not None and not v.startswith(("ipc://", "tcp://*:")):
        raise ValueError(f"KV event endpoints must be ipc:// paths (or tcp://*:PORT in a pod), got {v!r}")
    return v


class VllmEngineConfig(_EngineBase):
    """A vLLM OpenAI server subprocess (``kind = "vllm"``, the default)."""

    kind: Literal["vllm"] = "vllm"
    replay_endpoint: str | None = None
    cpu_bind: str | None = Field(default=None, description="VLLM_CPU_OMP_THREADS_BIND, e.g. '0' or '0-3'")
    cpu_affinity: str | None = Field(default=None, description="CPUs the whole engine process tree may run on "
                                     "(e.g. '1' or '2-7,10'); keeps its busy-polling processes off the "
                                     "gateway's cores")
    kv_cache_gib: float = Field(default=1.0, gt=0, description="KV cache size (VLLM_CPU_KVCACHE_SPACE)")
    max_model_len: int | None = Field(default=None, gt=0)
    dtype: Dtype = Field(default="auto", description="auto: bfloat16 where the CPU computes it natively "
                         "(AVX512-BF16/AMX), else float32")
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs per replica (vLLM's "
                                      "--tensor-parallel-size); kvmesh up gives each replica its own")
    gpus: str | None = Field(default=None, description="CUDA_VISIBLE_DEVICES of this replica; kvmesh up sets "
                             "it per replica from [supervisor] gpus")
    extra_args: tuple[str, ...] = Field(default=(), description="vLLM flags passed as they are (after -- on "
                                        "the command line)")
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables of the engine process")
    cache_node_socket: str | None = Field(default=None,
                                          description="Attach kvmesh's KV connector to this cache node socket")
    connector_async: bool = Field(default=True, description="KV connector: load and save on its own threads, "
                                  "off the engine's step (false: load before the forward, save before it returns)")

    @field_validator("cpu_affinity")
    @classmethod
    def _cpu_list(cls, v: str | None) -> str | None:
        if v is not None:
            parse_cpu_list(v)
        return v

    @field_validator("replay_endpoint")
    @classmethod
    def _ipc_replay(cls, v: str | None) -> str | None:
        return _ipc_endpoint(v)


class SimEngineConfig(_EngineBase):
    """kvmesh's simulated engine, in-process (``kind = "sim"``): vLLM's HTTP API and KV events, with
    timing from a profile instead of a model."""

    kind: Literal["sim"]
    profile: str = Field(default="cpu-demo-small", description="Timing profile (a name or a JSON file)")
    time_scale: float = Field(default=1.0, gt=0, description="Wall seconds per simulated second")
    block_size: int = Field(default=16, gt=0, description="KV block size in tokens")

    @field_validator("kv_events_endpoint")
    @classmethod
    def _ipc_only(cls, v: str | None) -> str | None:
        # the simulated engine binds whatever it is given (vLLM's tcp://host rule above does not apply), so a
        # tcp://<address>:PORT publisher is fine — the local run of a sim ModelService's pods uses one per pod
        if v is not None and not v.startswith(("ipc://", "tcp://")):
            raise ValueError(f"KV event endpoints must be ipc:// or tcp:// endpoints, got {v!r}")
        return v


def _engine_kind(v: object) -> str:
    # A table without ``kind`` is a vLLM engine (as before the union existed).
    if isinstance(v, dict):
        return str(v.get("kind", "vllm"))
    return str(getattr(v, "kind", "vllm"))


EngineConfig = Annotated[
    Annotated[VllmEngineConfig, Tag("vllm")] | Annotated[SimEngineConfig, Tag("sim")],
    Discriminator(_engine_kind, custom_error_type="engine_kind",
                  custom_error_message="engine kind must be 'vllm' or 'sim'"),
]
"""An engine replica's config, by ``kind``: each kind accepts only its own fields."""
_ENGINE = TypeAdapter[VllmEngineConfig | SimEngineConfig](EngineConfig)


def engine_config(**fields: object) -> VllmEngineConfig | SimEngineConfig:
    """Build the config of the engine ``kind`` names (``ValidationError`` as pydantic's)."""
    return _ENGINE.validate_python(fields)


class KubernetesEndpoints(_Strict):
    """Where discovery from Kubernetes finds its members: the EndpointSlices of a Service (or any label
    selector) in one namespace, read with the API server's list/watch (:mod:`kvmesh.discovery.kubernetes`)."""

    namespace: str | None = Field(default=None, description="Namespace of the EndpointSlices; the pod's own "
                                  "(service account) namespace when unset")
    service: str | None = Field(default=None, description="Service whose EndpointSlices list the members "
                                "(label kubernetes.io/service-name)")
    selector: str | None = Field(default=None, description="Label selector of the EndpointSlices, instead of "
                                 "a service")
    api_server: str | None = Field(default=None, description="API server URL; in-cluster service account when "
                                   "unset, else ~/.kube/config")
    port: str | None = Field(default=None, description="Name of the EndpointSlice port to use (engines: 'http', "
                             "cache nodes: 'peer'); the slice's only port also fits")

    @model_validator(mode="after")
    def _one_source(self) -> KubernetesEndpoints:
        if self.service and self.selector:
            raise ValueError("give a service or a selector, not both")
        return self

    def label_selector(self) -> str:
        """The label selector the list/watch sends (a service's EndpointSlices carry its name as a label)."""
        return self.selector or (f"kubernetes.io/service-name={self.service}" if self.service else "")


class CacheNodeConfig(_Strict):
    """The per-machine cache node: DRAM arena over an SSD directory."""

    enabled: bool = Field(default=True, description="kvmesh up starts a node and connects vLLM engines to it")
    socket: str | None = Field(default=None, description="Unix socket; <run_dir>/cache-node.sock when unset")
    arena_path: str | None = Field(default=None, description="Shared-memory file; /dev/shm/kvmesh-<id> when unset")
    dram_mib: int = Field(default=1024, ge=1)
    ssd_dir: str | None = Field(default=None, description="SSD tier directory; <run_dir>/cache-ssd when unset")
    ssd_mib: int = Field(default=8192, ge=0, description="0 disables the SSD tier")
    eviction: Literal["lru", "s3fifo", "ttl"] = "lru"
    ttl_s: float | None = Field(default=None, gt=0)
    admit_after: int = Field(default=1, ge=1, description="Store a chunk only once offered this many times")
    tenant_quota_mib: dict[str, int] = Field(default_factory=dict,
                                             description="DRAM bytes per tenant (gateway tenant name); over it, "
                                                         "the tenant's own chunks are evicted first")
    tenant_ssd_quota_mib: dict[str, int] = Field(default_factory=dict,
                                                 description="SSD bytes per tenant; over it, the tenant's own "
                                                             "chunks leave the SSD tier first")
    events: bool = Field(default=True, description="Publish tier changes as KV events")
    http_port: int | None = Field(default=0, ge=0, le=65535, description="/metrics and /status; 0: any free port")
    http_host: str = Field(default="127.0.0.1", description="Address of /metrics and /status (0.0.0.0 in a pod: "
                                                            "the kubelet's probe and Prometheus come from outside)")
    node_id: str | None = Field(default=None, description="Stable id in the pool (random when unset)")
    peer_port: int | None = Field(default=None, ge=0, le=65535,
                                  description="Join a pool: serve peers on this TCP port (0: any); None: standalone")
    peer_host: str = Field(default="127.0.0.1", description="Address the pool listener binds and peers reach "
                                                            "this node at (advertised in etcd); the pod IP on "
                                                            "Kubernetes")
    peers: tuple[str, ...] = Field(default=(), description="Static pool members as id=host:port")
    replicas: int = Field(default=1, ge=1, le=8, description="Copies of each chunk in the pool")
    etcd: str | None = Field(default=None, description="Discover pool members through etcd (http://host:port)")
    etcd_ttl_s: int = Field(default=5, ge=1, description="Lease: a dead node leaves the pool after this long")
    discovery: Literal["static", "kubernetes"] = Field(default="static", description="Pool members: static "
                                                       "(peers, or etcd when set) or kubernetes (the cache-node "
                                                       "EndpointSlices; node_id must be the pod name)")
    kubernetes: KubernetesEndpoints = Field(default_factory=KubernetesEndpoints,
                                            description="The cache-node EndpointSlices (discovery = kubernetes)")
    remote: str | None = Field(default=None, description="Remote tier below SSD: redis://, redis+cluster://, "
                                                         "valkey://, s3://bucket/prefix?endpoint=..., file:///path")
    remote_ttl_s: float | None = Field(default=None, gt=0, description="Lifetime of remote objects (Redis)")

    @field_validator("remote")
    @classmethod
    def _remote(cls, v: str | None) -> str | None:
        if v is not None and v.split("://", 1)[0] not in ("redis", "rediss", "valkey", "redis+cluster", "s3", "file"):
            raise ValueError(f"remote tier {v!r} must be a redis://, redis+cluster://, valkey://, s3:// or file:// URL")
        return v

    @field_validator("peers")
    @classmethod
    def _peers(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for p in v:
            nid, _, addr = p.partition("=")
            host, _, port = addr.rpartition(":")
            if not nid or not host or not port.isdigit():
                raise ValueError(f"peer {p!r} must look like id=host:port")
        return v

    @model_validator(mode="after")
    def _one_membership(self) -> CacheNodeConfig:
        if self.discovery == "kubernetes" and (self.etcd or self.peers):
            raise ValueError("discovery = 'kubernetes' finds pool members itself: drop etcd and peers")
        if self.discovery == "kubernetes" and not self.kubernetes.label_selector():
            raise ValueError("discovery = 'kubernetes' needs kubernetes.service or kubernetes.selector")
        if self.etcd and self.peer_host in ("0.0.0.0", "::", ""):
            raise ValueError(f"peer_host {self.peer_host!r} is a wildcard, which peers cannot reach: give the "
                             "address this node is reached at (etcd advertises it)")
        return self


class SupervisorConfig(_Strict):
    """How many replicas to run and how to keep them alive."""

    replicas: int = Field(default=2, ge=1, le=64)
    base_port: int = Field(default=8100, ge=1024, le=65000)
    run_dir: str = Field(default="run", description="Logs and ipc sockets go here (kvmesh up: run/<gateway "
                         "port> unless set, so two stacks never share one)")
    gpus: str | None = Field(default=None, description="GPUs the replicas share out, e.g. '0-7' (each gets "
                             "tensor_parallel_size of them); default: CUDA_VISIBLE_DEVICES, else every GPU")
    bind_cores: bool = Field(default=True, description="Give replica i core i (mod cores)")
    start_timeout_s: float = Field(default=300.0, gt=0)
    restart_backoff_s: float = Field(default=1.0, gt=0)
    restart_backoff_max_s: float = Field(default=30.0, gt=0)
    stop_grace_s: float = Field(default=10.0, ge=0)
    prefill: int = Field(default=0, ge=0, le=64, description="Prefill-role replicas (P/D disaggregation; "
                         "0 with decode 0: aggregated). Set, replicas defaults to prefill + decode")
    decode: int = Field(default=0, ge=0, le=64, description="Decode-role replicas (P/D disaggregation)")

    @model_validator(mode="before")
    @classmethod
    def _pd_replicas(cls, v: object) -> object:
        # `--prefill 1 --decode 1` means two replicas without also saying --replicas 2
        if isinstance(v, dict) and "replicas" not in v and (v.get("prefill") or v.get("decode")):
            return {**v, "replicas": int(v.get("prefill") or 0) + int(v.get("decode") or 0)}
        return v

    @model_validator(mode="after")
    def _pd_fits(self) -> SupervisorConfig:
        if self.prefill + self.decode > self.replicas:
            raise ValueError(f"prefill {self.prefill} + decode {self.decode} replicas exceed replicas "
                             f"{self.replicas}")
        if self.prefill and self.prefill == self.replicas:
            raise ValueError("every replica is prefill-only: some must decode (set decode)")
        return self

    def roles(self) -> list[Literal["prefill", "decode", "both"]]:
        """Each replica's role, by index: the prefill ones first, then decode, the rest both."""
        both = self.replicas - self.prefill - self.decode
        roles: list[Literal["prefill", "decode", "both"]] = ["prefill"] * self.prefill
        return roles + ["decode"] * self.decode + ["both"] * both


class BackendSpec(_Strict):
    """One engine as the gateway sees it.  A plain URL string in a config file means ``{url = ...}``."""

    url: str
    name: str | None = None
    kv_events: str | None = Field(default=None, description="The engine's KV-event publisher endpoint")
    replay: str | None = Field(default=None, description="The publisher's replay endpoint")
    role: Literal["prefill", "decode", "both"] = Field(default="both", description="P/D role: prefill engines "
                                                       "only prefill for decode engines; both serves whole requests")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"backend {v!r} must be an http(s):// URL")
        return v.rstrip("/")


class RoutingConfig(_Strict):
    """Knobs of the KV-aware policies (see ``kvmesh.routing.kv_aware``)."""

    prefill_tps: float = Field(default=4000.0, gt=0, description="Prefill tokens/s per engine (initial)")
    learn_prefill_tps: bool = Field(default=True, description="Learn each engine's prefill throughput and "
                                    "decode step online from observed TTFT and TPOT")
    decode_penalty_s: float = Field(default=0.002, ge=0, description="Wait before the first token per "
                                    "request running on the engine")
    cpu_load_cost: float = Field(default=0.1, ge=0)
    storage_load_cost: float = Field(default=0.3, ge=0)
    recompute_weight: float = Field(default=0.5, ge=0, description="Weight of prefill redone elsewhere (fleet "
                                    "idle)")
    saturation_weight: float = Field(default=4.0, ge=0, description="Added to recompute_weight as the fleet "
                                     "saturates: queued prefill makes recomputing a cached prefix cost everyone")
    decode_weight: float = Field(default=0.2, ge=0, description="Seconds of TTFT one second of decode slowdown "
                                 "(this stream's and the running streams') is worth; 0 ignores the decode side")
    decode_s_per_seq: float = Field(default=1e-4, gt=0, description="Prior: decode step time per running "
                                    "request (then fitted per engine from observed TPOT)")
    decode_s_per_ctx_token: float = Field(default=2e-8, ge=0, description="Prior: decode step time per active "
                                          "context token")
    kv_pressure_s: float = Field(default=10.0, ge=0, description="Cost of an engine whose KV space is full")
    kv_high: float = Field(default=0.8, ge=0, lt=1, description="KV usage above which kv_pressure_s is charged")
    output_tokens: int = Field(default=128, gt=0, description="Expected output when a request sets no "
                               "max_tokens (then learned from finished streams)")
    session_prior: bool = Field(default=True, description="A session's previous turn counts as cached where it "
                                "ran, before the KV events confirm it")
    session_balance: float = Field(default=1.0, ge=0, description="A new session pays this times its prefill "
                                   "per live session its engine has above the least (spreads sessions)")
    session_live_s: float = Field(default=120.0, gt=0, description="A session with no turn for this long no "
                                  "longer counts as live")
    session_turns: float = Field(default=4.0, ge=1, description="Prior: turns a new session brings (then "
                                 "learned); session_balance charges this many turns' new work per live session")
    speculative_ttl_s: float = Field(default=2.0, ge=0)
    prefix_ttl_s: float = Field(default=600.0, gt=0, description="Lifetime of learned entries (prefix)")
    prefix_block_size: int = Field(default=128, gt=0, description="Chunk size of the prefix policy")
    max_index_blocks: int = Field(default=4_000_000, gt=0, description="Per engine")
    session_slack: int = Field(default=4, ge=0)


class CacheNodeSpec(_Strict):
    """A cache node whose tier events (DRAM → medium CPU, SSD → STORAGE) the KV index follows."""

    name: str = "cache-node"
    kv_events: str = Field(description="The node's KV-event publisher (ipc://)")
    replay: str | None = Field(default=None, description="The node's replay endpoint: what it published before "
                               "the gateway subscribed, e.g. its SSD inventory after a restart")
    engines: tuple[str, ...] = Field(default=(), description="Backends on the node's machine; empty: all")


class GatewayConfig(_Strict):
    """The OpenAI-compatible front door."""

    host: str = Field(default="127.0.0.1", description="Address to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="Port to listen on (0: any free port)")
    backends: tuple[BackendSpec, ...] = Field(default=(), description="Static engines")
    cache_nodes: tuple[CacheNodeSpec, ...] = Field(default=(), description="Cache nodes whose tiers routing counts")
    policy: str = Field(default=DEFAULT_POLICY, description="Routing policy — " + policy_help())
    tokenizer: str | None = Field(default=None, description="Model dir with tokenizer.json (KV-aware policies)")
    routing: RoutingConfig = RoutingConfig()
    pd: PdSettings = Field(default_factory=PdSettings, description="Prefill/decode disaggregation")
    debug_endpoints: bool = Field(default=True, description="Serve GET /debug/route (admin key when tenants)")
    tenants_file: str | None = Field(default=None, description="TOML with [[tenants]] and admin_key_sha256")
    drain_timeout_s: float = Field(default=30.0, ge=0, description="SIGTERM: wait this long for in-flight")
    max_in_flight_per_backend: int | None = Field(default=None, gt=0, description="Beyond this on every "
                                                  "replica, requests queue fairly across tenants (VTC)")
    max_queue: int = Field(default=1024, ge=0)
    queue_timeout_s: float = Field(default=30.0, gt=0)
    admission_reserve: float = Field(default=0.25, ge=0, le=1, description="Share of the fleet's capacity, on "
                                     "top of it, kept for tenants with nothing running: a quiet tenant starts "
                                     "at once instead of waiting for a flood's slot to free")
    max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0, description="Larger request bodies get 413")
    health_interval_s: float = Field(default=2.0, gt=0)
    connect_timeout_s: float = Field(default=2.0, gt=0)
    read_timeout_s: float = Field(default=600.0, gt=0, description="Max silence between upstream bytes")
    ttft_timeout_s: float = Field(default=120.0, gt=0, description="Streams: no first token in this and no "
                                  "progress on the engine's other streams (hung): retried elsewhere; busy: waited on")
    busy_timeout_s: float = Field(default=300.0, gt=0, description="Streams: most wait on a busy engine, then 503")
    max_expected_wait_s: float | None = Field(default=60.0, gt=0, description="Shed (503, Retry-After) when the "
                                              "queued prefill tokens / learned prefill tokens/s exceed this")
    cold_start_hold_s: float = Field(default=0.0, ge=0, description="Scale to zero: hold requests while no replica")
    queue_order: Literal["fcfs", "uncached-first"] = Field(default="fcfs", description="Engines' queue order "
                                                           "(kvmesh.gateway.order); uncached-first needs vLLM "
                                                           "--scheduling-policy priority (kvmesh up adds it)")
    order_aging: float = Field(default=20.0, ge=0, description="uncached-first: arrival + this x expected prefill")
    retry_after_s: int = Field(default=2, ge=1)
    max_connect_retries: int = Field(default=1, ge=0)
    session_header: str = "x-session-id"
    lazy_tokenize: bool = Field(default=True, description="Tokenise a prompt only up to the first block no engine "
                                "holds before routing it (the rest after sending); false: tokenise it all first")
    forward_token_ids: bool = Field(default=True, description="A text completion the policy tokenises is "
                                    "tokenised whole and sent to the engine as token ids, so the engine does not "
                                    "tokenise it again; only while every backend's /tokenize gave the gateway's "
                                    "own ids for a probe text (else text is sent)")
    discovery: Literal["static", "kubernetes"] = Field(default="static", description="Where backends come "
                                                       "from: static (backends, or the supervisor) or kubernetes "
                                                       "(the engines' EndpointSlices)")
    kubernetes: KubernetesEndpoints = Field(default_factory=KubernetesEndpoints,
                                            description="The engines' EndpointSlices (discovery = kubernetes)")

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        return policy_spec(v).name

    @field_validator("backends", mode="before")
    @classmethod
    def _urls(cls, v: object) -> object:
        if isinstance(v, list | tuple):
            return tuple({"url": x} if isinstance(x, str) else x for x in v)
        return v

    @model_validator(mode="after")
    def _one_source(self) -> GatewayConfig:
        # Discovered backends and a static list would fight over the pool (a reload syncs the static list).
        if self.discovery == "kubernetes" and self.backends:
            raise ValueError("discovery = 'kubernetes' finds the backends itself: drop the static backends")
        if self.discovery == "kubernetes" and not self.kubernetes.label_selector():
            raise ValueError("discovery = 'kubernetes' needs kubernetes.service or kubernetes.selector")
        return self


class StackConfig(_Strict):
    """Everything ``kvmesh up`` starts: N engine replicas from one template, and a gateway."""

    model_size: Literal["tiny", "small"] = Field(default="small", description="Demo model size: tiny or small")
    models_dir: str = "models"
    engine_kind: Literal["vllm", "sim"] = Field(default="vllm", description="Kind of the demo-model replicas: "
                                                "vllm or sim (simulated engines)")
    engine_dtype: Dtype = Field(default="auto", description="dtype of vLLM demo-model replicas; auto: bfloat16 "
                                "where the CPU computes it natively (AVX512-BF16/AMX), else float32")
    engine: EngineConfig | None = None
    supervisor: SupervisorConfig = SupervisorConfig()
    gateway: GatewayConfig = GatewayConfig()
    cache: CacheNodeConfig = CacheNodeConfig()

    @model_validator(mode="after")
    def _ports_do_not_collide(self) -> StackConfig:
        sup, gw = self.supervisor, self.gateway
        if gw.port and sup.base_port <= gw.port < sup.base_port + sup.replicas:
            raise ValueError(f"gateway port {gw.port} collides with the engine ports {sup.base_port}.."
                             f"{sup.base_port + sup.replicas - 1} (set supervisor.base_port)")
        return self


class ConfigError(Exception):
    """A config file that cannot be read or does not validate; the message is one line for the CLI."""


def load_stack_config(path: pathlib.Path | None) -> StackConfig:
    """Read a TOML file into a :class:`StackConfig` (defaults when ``path`` is None)."""
    if path is None:
        return StackConfig()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path} is not valid TOML: {e}") from e
    try:
        return StackConfig.model_validate(data)
    except ValidationError as e:
        loc, msg = first_error(e)
        raise ConfigError(f"config {path}: {'.'.join(loc)}: {msg} ({e.error_count()} error(s))") from e
