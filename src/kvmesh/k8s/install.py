"""What ``kvmesh k8s manifests`` prints and the Helm chart renders: the install bundle for one cluster.

**Contract (the Helm chart ``deploy/helm/kvmesh`` must render exactly this for the same values):**
``install_manifests(values: InstallValues) -> list[dict]`` is a pure function; its output, in order, is

1. the ModelService CRD (``kvmesh.k8s.crd.crd()``; a chart keeps it in ``crds/``),
2. ServiceAccount, ClusterRole, ClusterRoleBinding of the operator (least privilege: see :func:`rbac`),
3. the operator Deployment (``kvmesh operator``, one replica at a time: ``Recreate``),
4. when ``binpack_scheduler``: a ConfigMap with a second kube-scheduler profile ``kvmesh-binpack``
   (``NodeResourcesFit``/``MostAllocated`` on ``nvidia.com/gpu``) that engine pods opt into through
   ``spec.schedulerName`` — the cluster's scheduler must be started with it (docs/kubernetes.md),
5. when ``service_monitor``: a ``monitoring.coreos.com/v1`` ServiceMonitor over ``kvmesh`` gateway Services,
6. when ``grafana_dashboard``: a ConfigMap labelled ``grafana_dashboard: "1"`` (Grafana's dashboard sidecar)
   holding kvmesh's dashboards (:func:`dashboard_files`, from ``kvmesh.observability.dashboards``),
7. when ``prometheus_rules``: a ``monitoring.coreos.com/v1`` PrometheusRule holding kvmesh's alert rules
   (``kvmesh.observability.alerts.rule_groups``; the chart's ``rules/kvmesh-rules.yml``).

Every object carries ``metadata.namespace = values.namespace`` where namespaced.  :class:`InstallValues`
field names are the chart's ``values.yaml`` keys (camelCase aliases), so ``InstallValues.model_validate(
values_yaml)`` is how a test feeds both sides the same values.  Values are what a Helm template can print
exactly as Python does: the group timeout is whole seconds (Helm holds numbers as float64 and prints 1e6 as
``1e+06``; the chart prints ``int``), and the chart's namespace defaults to the release's when unset.
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field

from kvmesh.k8s.api import GROUP, PLURAL, _Spec
from kvmesh.k8s.crd import crd
from kvmesh.k8s.objects import DEFAULT_IMAGE, DEFAULT_VLLM_IMAGE

Obj = dict[str, Any]
OPERATOR = "kvmesh-operator"
BINPACK_PROFILE = "kvmesh-binpack"


class InstallValues(_Spec):
    # strict: no coercion ("300" for 300, "yes" for true), so that Helm's check against values.schema.json
    # and this model reject the same values files
    model_config = ConfigDict(**_Spec.model_config, strict=True)

    namespace: str = Field(default="kvmesh-system", min_length=1, description="Namespace of the operator "
                           "(the Helm chart: the release's namespace when unset)")
    image: str = Field(default=DEFAULT_IMAGE, description="kvmesh image: operator, gateway, cache nodes, sim")
    vllm_image: str = Field(default=DEFAULT_VLLM_IMAGE, description="Default engine image (vLLM + kvmesh)")
    watch_namespace: str | None = Field(default=None, description="Watch one namespace; all when unset")
    group_timeout_seconds: int = Field(default=300, gt=0, description="Group placement deadline (seconds)")
    binpack_scheduler: bool = True
    service_monitor: bool = False
    grafana_dashboard: bool = False
    prometheus_rules: bool = False


def _meta(v: InstallValues, name: str, namespaced: bool = True) -> Obj:
    m: Obj = {"name": name, "labels": {"app.kubernetes.io/name": "kvmesh", "app.kubernetes.io/component":
                                       "operator", "app.kubernetes.io/part-of": "kvmesh"}}
    if namespaced:
        m["namespace"] = v.namespace
    return m


def _rule(groups: list[str], resources: list[str], verbs: list[str]) -> Obj:
    return {"apiGroups": groups, "resources": resources, "verbs": verbs}


WRITE = ["get", "list", "watch", "create", "update", "patch", "delete"]
READ = ["get", "list", "watch"]


def rbac(v: InstallValues) -> list[Obj]:
    """What the operator may do: read and status-write ModelServices, own exactly the kinds it creates,
    read pods (scheduling state), write events; discovery's Roles need it to hold endpointslices read."""
    rules = [
        _rule([GROUP], [PLURAL], READ), _rule([GROUP], [f"{PLURAL}/status"], ["get", "update", "patch"]),
        _rule(["apps"], ["deployments", "statefulsets", "daemonsets"], WRITE),
        _rule([""], ["services", "configmaps", "serviceaccounts"], WRITE),
        _rule(["policy"], ["poddisruptionbudgets"], WRITE),
        _rule(["rbac.authorization.k8s.io"], ["roles", "rolebindings"], WRITE),
        _rule([""], ["pods"], READ), _rule(["discovery.k8s.io"], ["endpointslices"], READ),
        _rule(["", "events.k8s.io"], ["events"], ["create", "patch"]),
    ]
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(v, OPERATOR)}
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": _meta(v, OPERATOR, False), "rules": rules}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": _meta(v, OPERATOR, False),
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": OPERATOR},
               "subjects": [{"kind": "ServiceAccount", "name": OPERATOR, "namespace": v.namespace}]}
    return [sa, role, binding]


def operator_deployment(v: InstallValues) -> Obj:
    args = ["operator", "--image", v.image, "--vllm-image", v.vllm_image,
            "--group-timeout-s", str(v.group_timeout_seconds)]
    if v.watch_namespace:
        args += ["--namespace", v.watch_namespace]
    sel = {"app.kubernetes.io/name": "kvmesh", "app.kubernetes.io/component": "operator"}
    container = {"name": "operator", "image": v.image, "command": ["kvmesh"], "args": args,
                 "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
                 "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                     "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(v, OPERATOR),
            "spec": {"replicas": 1, "strategy": {"type": "Recreate"},  # one writer: never two operators at once
                     "selector": {"matchLabels": sel},
                     "template": {"metadata": {"labels": {**_meta(v, OPERATOR)["labels"], **sel}},
                                  "spec": {"serviceAccountName": OPERATOR, "containers": [container]}}}}


def scheduler_config(v: InstallValues) -> Obj:
    """A second kube-scheduler profile packing GPU pods onto the fullest nodes first."""
    import yaml  # the k8s extra

    cfg = {"apiVersion": "kubescheduler.config.k8s.io/v1", "kind": "KubeSchedulerConfiguration",
           "profiles": [{"schedulerName": "default-scheduler"}, {
               "schedulerName": BINPACK_PROFILE,
               "pluginConfig": [{"name": "NodeResourcesFit", "args": {"scoringStrategy": {
                   "type": "MostAllocated",
                   "resources": [{"name": "nvidia.com/gpu", "weight": 5}, {"name": "cpu", "weight": 1},
                                 {"name": "memory", "weight": 1}]}}}]}]}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(v, "kvmesh-scheduler-config"),
            "data": {"scheduler-config.yaml": yaml.safe_dump(cfg, sort_keys=False)}}


def service_monitor(v: InstallValues) -> Obj:
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": _meta(v, "kvmesh"),
            "spec": {"namespaceSelector": {"any": True},
                     "selector": {"matchLabels": {"app.kubernetes.io/name": "kvmesh",
                                                  "app.kubernetes.io/component": "gateway"}},
                     "endpoints": [{"port": "http", "path": "/metrics"}]}}


def dashboard_files() -> dict[str, str]:
    """File name → dashboard JSON, as the ConfigMap and the chart's ``dashboards/`` hold them (byte-equal)."""
    from kvmesh.observability.dashboards import dashboards, render

    return {name: render(d) for name, d in dashboards().items()}


def dashboard_config_map(v: InstallValues) -> Obj:
    meta = _meta(v, "kvmesh-dashboard")
    meta["labels"]["grafana_dashboard"] = "1"
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": dashboard_files()}


def rules_file() -> str:
    """The alert rules as the chart's ``rules/kvmesh-rules.yml`` holds them (``deploy/prometheus``'s file)."""
    from kvmesh.observability.alerts import rules_yaml

    return rules_yaml()


def prometheus_rule(v: InstallValues) -> Obj:
    from kvmesh.observability.alerts import rule_groups

    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": _meta(v, "kvmesh"),
            "spec": {"groups": rule_groups()}}


def install_manifests(v: InstallValues) -> list[Obj]:
    out = [crd(), *rbac(v), operator_deployment(v)]
    if v.binpack_scheduler:
        out.append(scheduler_config(v))
    if v.service_monitor:
        out.append(service_monitor(v))
    if v.grafana_dashboard:
        out.append(dashboard_config_map(v))
    if v.prometheus_rules:
        out.append(prometheus_rule(v))
    return out


def to_yaml(objects: list[Obj]) -> str:
    """A multi-document YAML stream, as ``kubectl apply -f -`` reads it."""
    import yaml

    return "".join("---\n" + yaml.safe_dump(o, sort_keys=False) for o in objects)
