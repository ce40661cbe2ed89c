"""The ``kvmesh.io/v1alpha1`` API: kind ``ModelService`` — one served model and everything around it.

One source of truth: these pydantic models are what the reconcile reads, and the CRD's structural OpenAPI
schema is generated from them (``kvmesh.k8s.crd``), so the API server and the operator accept the same specs.
Field names are camelCase on the wire (Kubernetes convention) through aliases; Python uses snake_case.

Cross-field rules live in :data:`RULES` once: each is a CEL expression the API server evaluates
(``x-kubernetes-validations``) *and* a Python predicate the operator evaluates, with one message, so a spec
that reaches the operator past an API server without CEL (or a hand-built test object) fails the same way.

Vocabulary borrowed where users know it: ``roles`` with ``replicas``/``minReplicas``/``maxReplicas`` like
AIBrix's PodAutoscaler, ``podsPerReplica`` like StormService's ``podGroupSize``.  Only the ``aggregated`` role
exists today; ``prefill``/``decode`` roles will sit beside it (the P/D issue) without changing this shape.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from pydantic.alias_generators import to_camel
from pydantic.fields import FieldInfo

from kvmesh.config import RoutingConfig
from kvmesh.policy_names import POLICIES

GROUP = "kvmesh.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ModelService"
PLURAL = "modelservices"
SHORT_NAMES = ("ms", "kms")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True)


class ModelSource(_Spec):
    """What the engine serves and where it reads it from; nothing is downloaded by kvmesh itself."""

    name: str = Field(min_length=1, max_length=253, description="Served model name (what clients ask for)")
    source: str = Field(pattern=r"^(/|pvc://|hf://|s3://)", description="A path in the image or on a node "
                        "(/...), a PersistentVolumeClaim (pvc://claim/sub/path), or a hub/bucket id the engine "
                        "itself reads (hf://org/model, s3://bucket/prefix)")


class SimSettings(_Spec):
    """Timing of simulated engines (``engine.kind: sim``)."""

    profile: str = Field(default="cpu-demo-small", description="Timing profile name")
    time_scale: float = Field(default=1.0, gt=0, description="Wall seconds per simulated second")
    block_size: int = Field(default=16, gt=0, description="KV block size in tokens")


class Toleration(_Spec):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class EnvVar(_Spec):
    name: str = Field(min_length=1)
    value: str = ""


class Resources(_Spec):
    requests: dict[str, int | str] = Field(default_factory=dict, description="e.g. cpu: 4, memory: 32Gi")
    limits: dict[str, int | str] = Field(default_factory=dict)


class EngineSpec(_Spec):
    """The engine pods: one per replica, or ``podsPerReplica`` per replica (tensor parallel across nodes)."""

    kind: Literal["vllm", "sim"] = Field(default="vllm", description="vllm (a real engine) or sim (kvmesh's "
                                         "simulated engine: vLLM's API and KV events, no GPU)")
    image: str | None = Field(default=None, description="Engine image (vllm: a vLLM image with kvmesh installed; "
                              "sim: the kvmesh image when unset)")
    args: list[str] = Field(default_factory=list, description="Extra engine arguments, appended")
    env: list[EnvVar] = Field(default_factory=list)
    resources: Resources = Field(default_factory=Resources)
    gpus: int = Field(default=1, ge=0, le=16, description="nvidia.com/gpu per pod (sim engines ask for none)")
    tensor_parallel_size: int = Field(default=1, ge=1, le=128, description="GPUs one replica spans")
    pods_per_replica: int = Field(default=1, ge=1, le=16, description="Pods one replica spans; above 1 the "
                                  "replica is a group placed all-or-nothing")
    max_model_len: int | None = Field(default=None, gt=0)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    affinity: dict[str, Any] | None = Field(default=None, description="A Pod affinity, as in a Pod spec")
    sim: SimSettings = Field(default_factory=SimSettings)


class RoleSpec(_Spec):
    replicas: int = Field(default=1, ge=0, le=512, description="Replicas now (the scale subresource sets it)")
    min_replicas: int = Field(default=0, ge=0, le=512)
    max_replicas: int = Field(default=512, ge=1, le=512)


class Roles(_Spec):
    aggregated: RoleSpec = Field(default_factory=RoleSpec, description="Replicas doing prefill and decode")


class SsdSpec(_Spec):
    mib: int = Field(default=0, ge=0, description="SSD tier size; 0 disables it")
    host_path: str | None = Field(default=None, pattern=r"^/", description="Node directory (an SSD mount); an "
                                  "emptyDir of this size when unset")


class CacheSpec(_Spec):
    """The per-machine cache node (a DaemonSet on the engines' nodes) and its pool."""

    enabled: bool = True
    dram_mib: int = Field(default=1024, ge=1, description="DRAM tier (shared-memory arena) per node")
    ssd: SsdSpec = Field(default_factory=SsdSpec)
    eviction: Literal["lru", "s3fifo", "ttl"] = "lru"
    ttl_seconds: float | None = Field(default=None, gt=0, description="Object lifetime (eviction: ttl)")
    pool_replicas: int = Field(default=1, ge=1, le=8, description="Copies of each chunk in the pool")
    remote: str | None = Field(default=None, pattern=r"^(redis|rediss|valkey|redis\+cluster|s3|file)://",
                               description="Remote tier below SSD")


def _knobs_model() -> type[BaseModel]:
    """``RoutingConfig``'s knobs, camelCase and all optional: an unset knob keeps the gateway's default, and
    a knob added to the gateway appears here (and in the CRD) without a copy."""
    fields: dict[str, Any] = {}
    for name, f in RoutingConfig.model_fields.items():
        knob = FieldInfo(default=None, description=f.description, alias=to_camel(name))
        knob.metadata = list(f.metadata)  # ge/gt bounds carry over
        fields[name] = (f.annotation | None, knob)  # type: ignore[operator]
    return create_model("RoutingKnobs", __base__=_Spec, **fields)


RoutingKnobs = _knobs_model()


class RoutingSpec(_Spec):
    # kv-aware, not the local default: a ModelService's gateways always get the engines' KV events
    policy: Literal[POLICIES] = Field(default="kv-aware", description="Routing policy")  # type: ignore[valid-type]
    knobs: RoutingKnobs = Field(default_factory=RoutingKnobs, description="Cost-model knobs")  # type: ignore[valid-type]

    def knob_values(self) -> dict[str, Any]:
        """The knobs that were set, by their ``RoutingConfig`` names."""
        knobs: BaseModel = self.knobs
        return knobs.model_dump(exclude_none=True)


class GatewaySpec(_Spec):
    replicas: int = Field(default=2, ge=1, le=64, description="Gateway pods (a PodDisruptionBudget keeps one up)")
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    port: int = Field(default=80, ge=1, le=65535, description="Service port")


class TenantsSpec(_Spec):
    secret_name: str = Field(min_length=1, description="Secret with key tenants.toml ([[tenants]], admin key)")


class ModelServiceSpec(_Spec):
    model: ModelSource
    engine: EngineSpec = Field(default_factory=EngineSpec)
    roles: Roles = Field(default_factory=Roles)
    cache: CacheSpec = Field(default_factory=CacheSpec)
    routing: RoutingSpec = Field(default_factory=RoutingSpec)
    gateway: GatewaySpec = Field(default_factory=GatewaySpec)
    tenants: TenantsSpec | None = None
    priority_class_name: str | None = Field(default=None, description="Pods of a higher class preempt a lower "
                                            "one's when GPUs run out")
    scheduler_name: str | None = Field(default=None, description="e.g. kvmesh-binpack: fill GPU nodes first")

    @model_validator(mode="after")
    def _rules(self) -> ModelServiceSpec:
        for rule in RULES:
            if not rule.holds(self):
                raise ValueError(f"spec.{rule.path}: {rule.message}" if rule.path else rule.message)
        return self


@dataclass(frozen=True, slots=True)
class Rule:
    """One cross-field rule: where it sits in the schema, its CEL, its message, its Python twin."""

    path: str  # dotted spec path of the object the rule is attached to ("" for spec)
    cel: str
    message: str
    holds: Callable[[ModelServiceSpec], bool]


RULES: tuple[Rule, ...] = (
    Rule("roles.aggregated", "self.minReplicas <= self.maxReplicas", "minReplicas must not exceed maxReplicas",
         lambda s: s.roles.aggregated.min_replicas <= s.roles.aggregated.max_replicas),
    Rule("roles.aggregated", "self.replicas >= self.minReplicas && self.replicas <= self.maxReplicas",
         "replicas must lie within minReplicas..maxReplicas",
         lambda s: s.roles.aggregated.min_replicas <= s.roles.aggregated.replicas <= s.roles.aggregated.max_replicas),
    Rule("engine", "self.kind == 'sim' || self.tensorParallelSize == self.gpus * self.podsPerReplica",
         "tensorParallelSize must equal gpus × podsPerReplica for vllm engines",
         lambda s: s.engine.kind == "sim"
         or s.engine.tensor_parallel_size == s.engine.gpus * s.engine.pods_per_replica),
    Rule("engine", "self.kind == 'vllm' || self.podsPerReplica == 1",
         "sim engines run one pod per replica",
         lambda s: s.engine.kind == "vllm" or s.engine.pods_per_replica == 1),
    Rule("", "self.engine.kind == 'vllm' || self.model.source.startsWith('/') || "
         "self.model.source.startsWith('pvc://')", "sim engines read the model's tokenizer from a path or a PVC",
         lambda s: s.engine.kind == "vllm" or s.model.source.startswith(("/", "pvc://"))),
    Rule("cache", "self.eviction != 'ttl' || has(self.ttlSeconds)", "eviction ttl needs ttlSeconds",
         lambda s: s.cache.eviction != "ttl" or s.cache.ttl_seconds is not None),
)


class Condition(_Spec):
    type: Literal["Ready", "Progressing", "Degraded"]
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = ""
    observed_generation: int = 0
    last_transition_time: str = ""


class RoleStatus(_Spec):
    desired: int = 0
    ready: int = 0


class GroupStatus(_Spec):
    """A multi-pod replica (group) the operator placed or rolled back."""

    index: int
    phase: Literal["Placing", "Placed", "RolledBack"]
    since: str = Field(description="When the phase began (RFC 3339)")
    rollbacks: int = 0


class ModelServiceStatus(_Spec):
    observed_generation: int = 0
    conditions: list[Condition] = Field(default_factory=list)
    roles: dict[str, RoleStatus] = Field(default_factory=dict)
    replicas: int = Field(default=0, description="Desired replicas of the aggregated role (scale subresource)")
    ready_replicas: int = 0
    selector: str = Field(default="", description="Label selector of the engine pods (scale subresource)")
    gateway_endpoint: str = ""
    groups: list[GroupStatus] = Field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ModelService:
    """A ModelService as the operator sees it: identity, generation and the parsed spec/status."""

    name: str
    namespace: str
    uid: str
    generation: int
    spec: ModelServiceSpec
    status: ModelServiceStatus
    deleting: bool = False

    @classmethod
    def from_object(cls, obj: dict[str, Any]) -> ModelService:
        """From the API server's JSON; pydantic's ValidationError when the spec breaks a rule."""
        meta = obj["metadata"]
        return cls(name=meta["name"], namespace=meta.get("namespace", "default"), uid=meta.get("uid", ""),
                   generation=int(meta.get("generation", 1)),
                   spec=ModelServiceSpec.model_validate(obj.get("spec", {})),
                   status=ModelServiceStatus.model_validate(obj.get("status") or {}),
                   deleting=bool(meta.get("deletionTimestamp")))
