"""A CRD's structural schema applied as the API server does: prune, default, validate.

Order and wording follow kube-apiserver so that a bad resource is refused at
`kubectl apply` with the message a real cluster gives (the field path included):

- pruning: fields not in the schema are dropped (kept under
  `x-kubernetes-preserve-unknown-fields`); with `fieldValidation=Strict` (kubectl's
  default) they are an error instead, with `Warn` a warning header;
- nulls in non-nullable fields are dropped, then `default`s fill missing fields,
  recursively wherever the parent exists;
- validation: jsonschema (draft 4, the dialect of OpenAPI v3.0: boolean exclusive
  bounds) over the schema with `nullable` and `x-kubernetes-int-or-string` translated;
  each error is reworded as the API server words it;
- `x-kubernetes-validations`: a CEL subset (`k8s_cel`), transition rules only on
  updates where the old value exists; rules outside the subset are skipped and logged.
"""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

import jsonschema

from . import k8s_cel
from .k8s_errors import ApiError, bad_request, invalid

log = logging.getLogger(__name__)

Cause = tuple[str, str, str]  # (reason, field path, detail)

_SKIPPED_NOTED: set[str] = set()


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _shown(value: Any) -> str:
    """A value as the API server quotes it after 'Invalid value:'."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    if isinstance(value, str):
        return json.dumps(value)
    return json.dumps(_json_type(value))


def _path(parts: list[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _to_jsonschema(node: Any) -> Any:
    """OpenAPI v3.0 structural schema -> draft-4 JSON schema (nullable, int-or-string)."""
    if isinstance(node, list):
        return [_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "default"}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["type"] = ["integer", "string"]
    if node.get("nullable"):
        kind = out.get("type")
        if isinstance(kind, str):
            out["type"] = [kind, "null"]
        elif isinstance(kind, list) and "null" not in kind:
            out["type"] = [*kind, "null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
    out.pop("nullable", None)
    out.pop("format", None)  # the API server checks a few formats; the sandbox does not
    return out


class StructuralSchema:
    """One served version's openAPIV3Schema with the API server's admission semantics."""

    def __init__(self, schema: dict[str, Any], *, kind: str, group: str) -> None:
        self.schema = schema
        self.kind = kind
        self.group = group
        self._validator = jsonschema.Draft4Validator(_to_jsonschema(schema))
        self._rules: dict[str, k8s_cel.Node | None] = {}

    # -- pruning ------------------------------------------------------------------------
    def _prune(self, value: Any, node: dict[str, Any], path: list[Any], unknown: list[str], root: bool) -> None:
        if isinstance(value, dict):
            props = node.get("properties")
            extra = node.get("additionalProperties")
            preserve = bool(node.get("x-kubernetes-preserve-unknown-fields"))
            embedded = bool(node.get("x-kubernetes-embedded-resource")) or root
            for key in list(value):
                if embedded and key in ("apiVersion", "kind", "metadata"):
                    continue  # ObjectMeta is the store's business, not the schema's
                if props is not None and key in props:
                    self._prune(value[key], props[key], [*path, key], unknown, root=False)
                elif isinstance(extra, dict):
                    self._prune(value[key], extra, [*path, key], unknown, root=False)
                elif preserve or extra is True:
                    continue
                else:
                    unknown.append(_path([*path, key]))
                    del value[key]
        elif isinstance(value, list) and isinstance(node.get("items"), dict):
            for i, item in enumerate(value):
                self._prune(item, node["items"], [*path, i], unknown, root=False)

    # -- defaulting ---------------------------------------------------------------------
    def _default(self, value: Any, node: dict[str, Any]) -> None:
        if isinstance(value, dict):
            props = node.get("properties") or {}
            for key, sub in props.items():
                if key in value and value[key] is None and not sub.get("nullable"):
                    del value[key]  # nulls in non-nullable fields are pruned, then defaulted
                if key not in value and "default" in sub:
                    value[key] = copy.deepcopy(sub["default"])
                if key in value:
                    self._default(value[key], sub)
            extra = node.get("additionalProperties")
            if isinstance(extra, dict):
                for key in value:
                    if key not in props:
                        self._default(value[key], extra)
        elif isinstance(value, list) and isinstance(node.get("items"), dict):
            for item in value:
                self._default(item, node["items"])

    # -- validation ---------------------------------------------------------------------
    def _schema_causes(self, obj: dict[str, Any]) -> list[Cause]:
        causes: list[Cause] = []
        seen_required: set[str] = set()
        for error in self._validator.iter_errors(obj):
            parts = list(error.absolute_path)
            where = _path(parts)
            keyword, expected, value = error.validator, error.validator_value, error.instance
            if keyword == "required":
                if where in seen_required:
                    continue
                seen_required.add(where)
                for missing in expected:
                    if isinstance(value, dict) and missing not in value:
                        causes.append(("FieldValueRequired", _path([*parts, missing]), "Required value"))
                continue
            if keyword == "type":
                wanted = expected if isinstance(expected, str) else next(t for t in expected if t != "null")
                got = _json_type(value)
                detail = f'Invalid value: "{got}": {where} in body must be of type {wanted}: "{got}"'
            elif keyword == "enum":
                allowed = ", ".join(json.dumps(v) for v in expected if v is not None)
                detail = f"Unsupported value: {_shown(value)}: supported values: {allowed}"
                causes.append(("FieldValueNotSupported", where, detail))
                continue
            elif keyword == "minimum":
                exclusive = (error.schema or {}).get("exclusiveMinimum") is True
                relation = "greater than" if exclusive else "greater than or equal to"
                detail = f"Invalid value: {_shown(value)}: {where} in body should be {relation} {expected}"
            elif keyword == "maximum":
                exclusive = (error.schema or {}).get("exclusiveMaximum") is True
                relation = "less than" if exclusive else "less than or equal to"
                detail = f"Invalid value: {_shown(value)}: {where} in body should be {relation} {expected}"
            elif keyword == "minLength":
                detail = f"Invalid value: {_shown(value)}: {where} in body should be at least {expected} chars long"
            elif keyword == "maxLength":
                causes.append(("FieldValueTooLong", where, f"Too long: may not be more than {expected} bytes"))
                continue
            elif keyword == "pattern":
                detail = f"Invalid value: {_shown(value)}: {where} in body should match '{expected}'"
            elif keyword == "minItems":
                detail = f"Invalid value: {len(value)}: {where} in body should have at least {expected} items"
            elif keyword == "maxItems":
                causes.append(
                    ("FieldValueTooMany", where, f"Too many: {len(value)}: must have at most {expected} items")
                )
                continue
            elif keyword == "minProperties":
                detail = f"Invalid value: {len(value)}: {where} in body should have at least {expected} properties"
            elif keyword == "maxProperties":
                causes.append(
                    ("FieldValueTooMany", where, f"Too many: {len(value)}: must have at most {expected} items")
                )
                continue
            elif keyword == "uniqueItems":
                causes.append(("FieldValueDuplicate", where, f"Duplicate value: {_shown(value)}"))
                continue
            elif keyword == "multipleOf":
                detail = f"Invalid value: {_shown(value)}: {where} in body should be a multiple of {expected}"
            else:
                detail = f"Invalid value: {_shown(value)}: {error.message}"
            causes.append(("FieldValueInvalid", where, detail))
        return causes

    def _rule(self, rule: str) -> k8s_cel.Node | None:
        if rule not in self._rules:
            try:
                self._rules[rule] = k8s_cel.compile_rule(rule)
            except k8s_cel.CelUnsupported as exc:
                self._rules[rule] = None
                if rule not in _SKIPPED_NOTED:
                    _SKIPPED_NOTED.add(rule)
                    log.info("CEL rule not evaluated by the sandbox (%s): %s", exc, rule)
        return self._rules[rule]

    def _cel_causes(self, value: Any, old: Any, node: dict[str, Any], path: list[Any], out: list[Cause]) -> None:
        for spec in node.get("x-kubernetes-validations") or []:
            compiled = self._rule(spec.get("rule", ""))
            if compiled is None:
                continue
            transition = k8s_cel.uses_old_self(compiled)
            if transition and old is None:
                continue
            where = _path(path) + (spec.get("fieldPath") or "")
            message = spec.get("message") or f"failed rule: {spec.get('rule')}"
            try:
                ok = k8s_cel.evaluate(compiled, value, old)
            except k8s_cel.CelError as exc:
                ok, message = False, f"{exc} evaluating rule: {spec.get('rule')}"
            if ok:
                continue
            reason = spec.get("reason") or "FieldValueInvalid"
            prefix = {
                "FieldValueForbidden": "Forbidden",
                "FieldValueRequired": "Required value",
                "FieldValueDuplicate": "Duplicate value",
            }.get(reason)
            detail = f"{prefix}: {message}" if prefix else f'Invalid value: "{_json_type(value)}": {message}'
            out.append((reason, where, detail))
        if isinstance(value, dict):
            props = node.get("properties") or {}
            extra = node.get("additionalProperties")
            for key, item in value.items():
                sub = props.get(key) if key in props else extra if isinstance(extra, dict) else None
                if sub is not None:
                    old_item = old.get(key) if isinstance(old, dict) else None
                    self._cel_causes(item, old_item, sub, [*path, key], out)
        elif isinstance(value, list) and isinstance(node.get("items"), dict):
            for i, item in enumerate(value):
                self._cel_causes(item, None, node["items"], [*path, i], out)  # no list correlation

    # -- admission ----------------------------------------------------------------------
    def admit(
        self,
        obj: dict[str, Any],
        old: dict[str, Any] | None,
        *,
        name: str,
        field_validation: str = "Warn",
        version: str = "",
    ) -> list[str]:
        """Prune, default and validate obj in place; returns warnings, raises ApiError."""
        unknown: list[str] = []
        self._prune(obj, self.schema, [], unknown, root=True)
        if unknown and field_validation == "Strict":
            fields = ", ".join(f'unknown field "{u}"' for u in unknown)
            raise bad_request(
                f'{self.kind} in version "{version}" cannot be handled as a {self.kind}: '
                f"strict decoding error: {fields}"
            )
        self._default(obj, self.schema)
        causes = self._schema_causes(obj)
        self._cel_causes(obj, old, self.schema, [], causes)
        if causes:
            causes.sort(key=lambda c: c[1])
            raise invalid(self.kind, self.group, name, causes)
        if field_validation == "Warn":
            return [f'unknown field "{u}"' for u in unknown]
        return []


def validate_crd_schema(schema: Any, crd_name: str) -> None:
    """The minimum a CRD needs for the sandbox to serve it (the API server checks much more)."""
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise ApiError(
            422,
            "Invalid",
            f'CustomResourceDefinition.apiextensions.k8s.io "{crd_name}" is invalid: '
            "spec.versions[0].schema.openAPIV3Schema.type: Required value: must be object at the root",
        )
    try:
        jsonschema.Draft4Validator.check_schema(_to_jsonschema(schema))
    except jsonschema.SchemaError as exc:
        raise ApiError(
            422,
            "Invalid",
            f'CustomResourceDefinition.apiextensions.k8s.io "{crd_name}" is invalid: '
            f"spec.versions[0].schema.openAPIV3Schema: Invalid value: {exc.message}",
        ) from exc
