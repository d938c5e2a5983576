"""The LoraResume CustomResourceDefinition, generated from the models in `spec.py`.

The models are the single source of truth; this module projects them onto the API server's
dialect of OpenAPI v3, the structural schema: every `$ref` inlined, a type on every node,
no `anyOf` of types, boolean exclusive bounds, no `additionalProperties` beside `properties`.
It adds what pydantic cannot say itself: defaults the API server can apply (taken from the
models, not from pydantic's JSON schema), and CEL rules that mirror the models' validators.

Optional fields (`X | None = None`) become plain, non-nullable `X`: the API server prunes a
null in a non-nullable field before validating, so `null` and an absent field mean the same,
as they do to the models. `nullable: true` would keep nulls, and then a null enum value fails
the enum check, and CEL rules see nulls.

    python -m loraresume_operator.crd > crds/loraresume.dev_loraresumes.yaml   # make crds
"""

from __future__ import annotations

import copy
import types
import typing
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from loraresume_trainer.config import DatasetSettings

from .k8s_names import MAX_LABEL_VALUE as MAX_NAME
from .spec import (
    CATEGORIES,
    EXTEND_ALONE,
    EXTEND_NOT_ADAPTER,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    STEPS_OR_EPOCHS,
    VERSION,
    AdapterSource,
    LoraResumeSpec,
    LoraResumeStatus,
    ResumeSpec,
    TrainingSpec,
    extra_refusals,
)

CRD_NAME = f"{PLURAL}.{GROUP}"
CRD_PATH = "crds/loraresume.dev_loraresumes.yaml"

HEADER = (
    "# Generated from operator/loraresume_operator/spec.py by `make crds`\n"
    "# (python -m loraresume_operator.crd); do not edit by hand.\n"
)


class UnsupportedSchema(ValueError):
    """A model uses a construct a structural schema cannot express; fix the model, not the YAML."""


def _set(field: str) -> str:
    """CEL for "set and not empty", as the pydantic validators test a string ('' counts as unset)."""
    return f"(has(self.{field}) && self.{field} != '')"


def _set_exactly_one(a: str, b: str) -> str:
    """CEL for `bool(self.a) != bool(self.b)`, as the pydantic validators test it ('' counts as unset)."""
    return f"(has(self.{a}) && self.{a} != '') != (has(self.{b}) && self.{b} != '')"


# CEL rules attached wherever a model's schema appears: the validators of those models, in CEL.
MODEL_RULES: dict[type[BaseModel], list[dict[str, str]]] = {
    DatasetSettings: [
        {
            "rule": _set_exactly_one("source", "name"),
            "message": "set exactly one of dataset.source (a file or s3:// URI) or dataset.name (a datasets name)",
        }
    ],
    AdapterSource: [
        {
            "rule": _set_exactly_one("uri", "fromResource"),
            "message": "set exactly one of adapter.uri (an s3:// URI) or adapter.fromResource (a LoraResume name)",
        }
    ],
    TrainingSpec: [{"rule": "!(has(self.maxSteps) && has(self.numTrainEpochs))", "message": STEPS_OR_EPOCHS}],
    ResumeSpec: [
        {
            "rule": f"!({_set('extendFrom')} && {_set('fromCheckpoint')})",
            "message": EXTEND_ALONE.format(other="fromCheckpoint"),
        },
        {
            "rule": f"!({_set('extendFrom')} && has(self.warmStart) && self.warmStart)",
            "message": EXTEND_ALONE.format(other="warmStart"),
        },
    ],
    LoraResumeSpec: [
        {
            "rule": f"!(has(self.resume) && {_set('resume.extendFrom')} && has(self.adapter))",
            "message": EXTEND_NOT_ADAPTER,
        },
        {
            "rule": f"!(has(self.resume) && {_set('resume.extendFrom')} && has(self.warmStart) && self.warmStart)",
            "message": EXTEND_ALONE.format(other="warmStart (spec.warmStart)"),
        },
        {
            # `self == oldSelf` on spec.adapter only runs when both sides have one.
            "rule": "has(self.adapter) == has(oldSelf.adapter)",
            "message": "adapter cannot be added or removed: it defines the run; create a new LoraResume "
            "(with a new storage.uri) instead",
        },
    ],
}

# Formats the API server validates; anything else from pydantic is a modelling question.
_FORMATS = {"date-time", "date", "duration", "uri", "email", "hostname", "ipv4", "ipv6", "cidr", "uuid", "byte"}
_PASSED = {
    "description", "type", "enum", "pattern", "minLength", "maxLength", "minimum", "maximum",
    "minItems", "maxItems", "minProperties", "maxProperties", "required",
    "x-kubernetes-validations", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string",
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
}  # fmt: skip
_DROPPED = {"title", "default", "$defs"}  # defaults come from the models (see _annotate)
_KEY_ORDER = (
    "description", "type", "format", "enum", "pattern", "minLength", "maxLength",
    "minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum", "minItems", "maxItems",
    "minProperties", "maxProperties", "default", "items", "properties", "additionalProperties",
    "required", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string",
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-validations",
)  # fmt: skip


def _inline(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Resolve a `$ref`: the class's schema, overlaid by the field's own keys (its description
    wins over the class docstring); CEL rules of both are kept."""
    if "$ref" not in node:
        return dict(node)
    over = {k: v for k, v in node.items() if k != "$ref"}
    target = _inline(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
    rules = target.get("x-kubernetes-validations", []) + over.get("x-kubernetes-validations", [])
    merged = {**target, **over}
    if rules:
        merged["x-kubernetes-validations"] = rules
    return merged


def _structural(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    """One pydantic JSON-schema node as a structural-schema node (recursively)."""
    node = _inline(node, defs)
    if "anyOf" in node:
        branches = [b for b in node.pop("anyOf") if b != {"type": "null"}]
        if len(branches) != 1:
            raise UnsupportedSchema(f"{path}: a union of several types cannot be a structural schema")
        node = _inline({**branches[0], **node}, defs)  # not nullable: see the module docstring
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED:
            continue
        if key == "x-kubernetes-validations":
            out[key] = [{"rule": r["rule"], **{k: v for k, v in r.items() if k != "rule"}} for r in value]
        elif key in _PASSED:
            out[key] = copy.deepcopy(value)
        elif key == "const":
            out["enum"] = [value]
        elif key == "format":
            if value not in _FORMATS:
                raise UnsupportedSchema(f"{path}: format {value!r} is not one the API server knows")
            out[key] = value
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            if bound in node:
                raise UnsupportedSchema(f"{path}: both {bound} and {key}")
            out[bound], out[key] = value, True  # OpenAPI v3.0: a flag on the bound
        elif key == "items":
            out["items"] = _structural(value, defs, f"{path}[]")
        elif key == "properties":
            out["properties"] = {name: _structural(sub, defs, f"{path}.{name}") for name, sub in value.items()}
        elif key == "additionalProperties":
            if isinstance(value, dict):
                out[key] = _structural(value, defs, f"{path}.*")
            elif value is True and not node.get("x-kubernetes-preserve-unknown-fields"):
                raise UnsupportedSchema(f"{path}: free-form object without x-kubernetes-preserve-unknown-fields")
            # `false`: unknown fields are pruned by the API server (and `false` beside properties is invalid)
        else:
            raise UnsupportedSchema(f"{path}: {key!r} has no structural-schema equivalent here")
    if "properties" in out and "additionalProperties" in out:
        raise UnsupportedSchema(f"{path}: properties and additionalProperties together")
    if "enum" in out and "type" not in out:
        kinds = {type(v) for v in out["enum"]}
        if kinds != {str}:
            raise UnsupportedSchema(f"{path}: enum of non-string values without a type")
        out["type"] = "string"
    if "type" not in out:
        raise UnsupportedSchema(f"{path}: no type")
    return out


def _unwrap(annotation: Any) -> Any:
    """`X | None` -> X; other annotations unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def _default_value(default: Any) -> Any:
    """A model default as the API server should store it: camelCase keys; nested models as `{}`
    when they are their class's defaults, so the nested schema defaults fill them in."""
    if (
        isinstance(default, BaseModel)
        and not any(f.is_required() for f in type(default).model_fields.values())
        and default == type(default)()
    ):
        return {}
    return to_jsonable_python(default, by_alias=True, exclude_none=True)


def _annotate(node: dict[str, Any], annotation: Any) -> None:
    """Walk schema and Python type together: add defaults and the models' CEL rules."""
    annotation = _unwrap(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        rules = MODEL_RULES.get(annotation, [])
        if rules:
            node["x-kubernetes-validations"] = node.get("x-kubernetes-validations", []) + copy.deepcopy(rules)
        if not node.get("description") and annotation.__doc__:
            node["description"] = " ".join(annotation.__doc__.split())
        for name, field in annotation.model_fields.items():
            prop = node["properties"][field.alias or name]
            if not field.is_required():
                default = field.get_default(call_default_factory=True)
                if default is not None:
                    if _unwrap(field.annotation) is not field.annotation:
                        raise UnsupportedSchema(
                            f"{annotation.__name__}.{name}: optional with a non-None default: the API server "
                            "would replace a null with the default, the model keeps None"
                        )
                    prop["default"] = _default_value(default)
            _annotate(prop, field.annotation)
    elif origin in (list, tuple, set, frozenset) and args and "items" in node:
        _annotate(node["items"], args[0])
    elif origin is dict and len(args) == 2 and isinstance(node.get("additionalProperties"), dict):
        _annotate(node["additionalProperties"], args[1])


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    """Keys in a fixed, readable order (description first); property order stays the model's."""
    keys = [k for k in _KEY_ORDER if k in node] + [k for k in node if k not in _KEY_ORDER]
    out = {}
    for key in keys:
        value = node[key]
        if key == "properties":
            value = {name: _ordered(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties"):
            value = _ordered(value)
        out[key] = value
    return out


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of one model (camelCase properties, defaults, CEL rules)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    schema = _structural(raw, raw.get("$defs", {}), model.__name__)
    _annotate(schema, model)
    return _ordered(schema)


def _extra_schema(extra: dict[str, Any]) -> dict[str, Any]:
    """spec.training.extra refuses the keys set elsewhere (spec.extra_refusals), naming the key.

    Not by CEL: the API server hides a schemaless value from CEL, declared or not. Each refused
    key is declared with a schema no value satisfies (`not: {}`): the refusal names the key's
    path, and the key's description (`kubectl explain`) says where it belongs.
    """
    refused = {
        key: {"description": f"Refused: {why}.", "x-kubernetes-preserve-unknown-fields": True, "not": {}}
        for key, why in extra_refusals().items()
    }
    return {**extra, "properties": refused}


def _root_schema() -> dict[str, Any]:
    spec = openapi_schema(LoraResumeSpec)
    training = spec["properties"]["training"]
    training["properties"]["extra"] = _ordered(_extra_schema(training["properties"]["extra"]))
    status = openapi_schema(LoraResumeStatus)
    return {
        "description": "A resumable LoRA fine-tune job: the operator runs the trainer in a pod, checkpoints "
        "to S3 and relaunches from the newest complete checkpoint after a preemption or failure.",
        "type": "object",
        "properties": {
            "apiVersion": {
                "description": "Versioned schema of this object; the API server may convert between versions.",
                "type": "string",
            },
            "kind": {"description": "REST resource this object represents (LoraResume).", "type": "string"},
            # The name is a label value on the trainer pods (selectors, ownership): 63 characters at most.
            "metadata": {
                "type": "object",
                "properties": {
                    "name": {
                        "description": "Name of the LoraResume; its trainer pods carry it as a label value.",
                        "type": "string",
                        "maxLength": MAX_NAME,
                    }
                },
            },
            "spec": spec,
            "status": status,
        },
        "required": ["spec"],
    }


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Where the job is."},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress", "description": "step/maxSteps."},
    {"name": "Loss", "type": "string", "jsonPath": ".status.loss", "description": "Last logged training loss."},
    {"name": "Attempt", "type": "integer", "jsonPath": ".status.attempt", "description": "Trainer pods started."},
    {"name": "Checkpoint", "type": "integer", "jsonPath": ".status.latestCheckpoint.step",
     "description": "Step of the newest complete (durable) checkpoint in S3."},
    {"name": "Preemptions", "type": "integer", "jsonPath": ".status.preemptions",
     "description": "Attempts ended by preemption."},
    {"name": "Failures", "type": "integer", "jsonPath": ".status.failures",
     "description": "Attempts ended by a failure."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1,
     "description": "What is happening."},
]  # fmt: skip


def build_crd() -> dict[str, Any]:
    """The apiextensions.k8s.io/v1 CustomResourceDefinition of LoraResume."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": list(CATEGORIES),
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": _root_schema()},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": copy.deepcopy(PRINTER_COLUMNS),
                }
            ],
        },
    }


def render_crd() -> str:
    """The CRD as committed in crds/: a header comment, then YAML."""
    body = yaml.safe_dump(build_crd(), sort_keys=False, width=110, allow_unicode=True)
    return HEADER + body


def main() -> None:
    print(render_crd(), end="")


if __name__ == "__main__":
    main()
