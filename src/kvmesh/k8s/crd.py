"""The ModelService CustomResourceDefinition, generated from ``kvmesh.k8s.api``.

Pydantic's JSON Schema becomes a Kubernetes *structural* schema: ``$ref`` inlined, ``Optional`` unwrapped
(an absent field is how Kubernetes spells null), ``int | str`` as ``x-kubernetes-int-or-string``, free-form
objects as ``x-kubernetes-preserve-unknown-fields``, JSON Schema 2020's numeric ``exclusiveMinimum`` as
OpenAPI v3.0's boolean form, object defaults as ``{}`` (the API server then fills each nested default).
``additionalProperties: false`` is dropped — structural schemas forbid it beside ``properties``; the API
server rejects unknown fields itself (strict field validation) or prunes them.  Cross-field rules
(``api.RULES``) are attached as CEL ``x-kubernetes-validations`` with their messages.

:func:`crd` returns the whole CustomResourceDefinition as a plain dict (what ``kubectl apply`` and the Helm
chart's ``crds/`` hold); ``deploy/crds/`` is its YAML and a test keeps the two equal.
"""

from __future__ import annotations

from typing import Any

from kvmesh.k8s.api import GROUP, KIND, PLURAL, RULES, SHORT_NAMES, VERSION, ModelServiceSpec, ModelServiceStatus

_KEEP = ("type", "description", "enum", "pattern", "minimum", "maximum", "minLength", "maxLength", "format",
         "minItems", "maxItems")
Schema = dict[str, Any]


def structural(schema: Schema, defs: dict[str, Schema]) -> Schema:
    """One pydantic JSON Schema node as a structural OpenAPI v3 node (recursively)."""
    if "$ref" in schema:
        target = defs[schema["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return structural(merged, defs)
    variants = [v for v in schema.get("anyOf", []) if v.get("type") != "null"]
    if variants:
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        if {v.get("type") for v in variants} == {"integer", "string"}:
            return _with_meta({"x-kubernetes-int-or-string": True}, rest)
        if len(variants) == 1:
            return structural({**variants[0], **rest}, defs)
        raise ValueError(f"no structural form for a union: {variants}")
    out: Schema = {k: schema[k] for k in _KEEP if k in schema}
    if "const" in schema:
        out["enum"] = [schema["const"]]
    if "exclusiveMinimum" in schema:
        out["minimum"], out["exclusiveMinimum"] = schema["exclusiveMinimum"], True
    if "default" in schema and schema["default"] is not None:
        out["default"] = {} if isinstance(schema["default"], dict) and "properties" in schema else schema["default"]
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        out["type"] = "object"
        _object(schema, defs, out)
    elif kind == "array":
        out["items"] = structural(schema.get("items", {}), defs)
    return out


def _object(schema: Schema, defs: dict[str, Schema], out: Schema) -> None:
    if "properties" in schema:
        out["properties"] = {k: structural(v, defs) for k, v in schema["properties"].items()}
        if schema.get("required"):
            out["required"] = list(schema["required"])
    elif isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = structural(schema["additionalProperties"], defs)
    else:  # a free-form object (e.g. a Pod affinity): the Pod schema validates it once rendered
        out["x-kubernetes-preserve-unknown-fields"] = True


def _with_meta(node: Schema, src: Schema) -> Schema:
    for k in ("description", "default"):
        if src.get(k) is not None:
            node[k] = src[k]
    return node


def _attach_rules(spec: Schema) -> None:
    for rule in RULES:
        node = spec
        for part in filter(None, rule.path.split(".")):
            node = node["properties"][part]
        node.setdefault("x-kubernetes-validations", []).append({"rule": rule.cel, "message": rule.message})


def spec_schema() -> Schema:
    js = ModelServiceSpec.model_json_schema(by_alias=True)
    spec = structural(js, js.get("$defs", {}))
    _attach_rules(spec)
    return spec


def status_schema() -> Schema:
    js = ModelServiceStatus.model_json_schema(by_alias=True)
    return structural(js, js.get("$defs", {}))


def _printer_columns() -> list[Schema]:
    ready = '.status.conditions[?(@.type=="Ready")].status'
    return [
        {"name": "Model", "type": "string", "jsonPath": ".spec.model.name"},
        {"name": "Engine", "type": "string", "jsonPath": ".spec.engine.kind"},
        {"name": "Desired", "type": "integer", "jsonPath": ".status.replicas"},
        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
        {"name": "Status", "type": "string", "jsonPath": ready},
        {"name": "Endpoint", "type": "string", "jsonPath": ".status.gatewayEndpoint", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition (apiextensions.k8s.io/v1) for ModelService."""
    version = {
        "name": VERSION, "served": True, "storage": True,
        "schema": {"openAPIV3Schema": {
            "type": "object", "description": "One served model: engines, cache nodes, gateway and routing.",
            "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                           "metadata": {"type": "object"}, "spec": spec_schema(), "status": status_schema()},
            "required": ["spec"]}},
        "subresources": {"status": {}, "scale": {
            "specReplicasPath": ".spec.roles.aggregated.replicas", "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector"}},
        "additionalPrinterColumns": _printer_columns(),
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {"group": GROUP, "scope": "Namespaced", "versions": [version],
                 "names": {"kind": KIND, "plural": PLURAL, "singular": KIND.lower(), "listKind": f"{KIND}List",
                           "shortNames": list(SHORT_NAMES), "categories": ["kvmesh"]}},
    }
