"""The LoraResume CRD: fresh, accepted by the API's own schema, structural, and in step with the model.

No API server runs here, so the API server's part is played by two small stand-ins: a
Draft 4 validator over the openAPIV3Schema (OpenAPI v3.0 keeps Draft 4's boolean exclusive
bounds) and the structural defaulting algorithm (`apply_defaults`).
"""

from __future__ import annotations

import copy
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python

from loraresume_operator import crd as crd_module
from loraresume_operator.crd import CRD_PATH, UnsupportedSchema, build_crd, openapi_schema, render_crd
from loraresume_operator.spec import (
    API_VERSION,
    CATEGORIES,
    KIND,
    MUTABLE_TRAINING_FIELDS,
    LoraResumeSpec,
    LoraResumeStatus,
    TrainingSpec,
    training_immutable_rule,
)
from loraresume_trainer.config import camel

ROOT = Path(__file__).resolve().parents[2]
IMMUTABLE = ("baseModel", "maxSeqLength", "adapter", "lora", "dataset", "training")
LIVE = ("resources", "scheduling", "restartPolicy")  # DESIGN: edits apply to the next attempt


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return build_crd()


@pytest.fixture(scope="module")
def root(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="module")
def spec_schema(root: dict[str, Any]) -> dict[str, Any]:
    return root["properties"]["spec"]


def nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node below (and including) `node`, with a dotted path."""
    yield path or ".", node
    for name, sub in node.get("properties", {}).items():
        yield from nodes(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from nodes(node["additionalProperties"], f"{path}.*")


def as_jsonschema(node: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI v3.0 schema -> Draft 4 JSON Schema: `nullable` becomes a null type; x- keys go."""
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            out[key] = as_jsonschema(node[key])
    if "properties" in node:
        out["properties"] = {name: as_jsonschema(sub) for name, sub in node["properties"].items()}
    if node.get("nullable"):
        out["type"] = [node["type"], "null"]
    return out


def apply_defaults(value: Any, node: dict[str, Any]) -> Any:
    """The API server's structural defaulting: absent fields get their default, top-down."""
    value = copy.deepcopy(value)
    if isinstance(value, dict) and "properties" in node:
        for name, sub in node["properties"].items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(value[name], sub)
    elif isinstance(value, dict) and isinstance(node.get("additionalProperties"), dict):
        value = {k: apply_defaults(v, node["additionalProperties"]) for k, v in value.items()}
    elif isinstance(value, list) and "items" in node:
        value = [apply_defaults(v, node["items"]) for v in value]
    return value


def schema_errors(root: dict[str, Any], doc: dict[str, Any]) -> list[jsonschema.ValidationError]:
    validator = jsonschema.Draft4Validator(as_jsonschema(root))
    return sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))


def resume_example() -> dict[str, Any]:
    """A valid resource to break field by field."""
    return yaml.safe_load((ROOT / "examples/resume.yaml").read_text())


# --- the file and the API's schema of CRDs -------------------------------------------------


def test_committed_crd_is_fresh() -> None:
    committed = (ROOT / CRD_PATH).read_text()
    assert committed == render_crd(), f"{CRD_PATH} is stale: run `make crds`"
    assert yaml.safe_load(committed) == build_crd()


@pytest.mark.parametrize("version", ["1.33.0", kubernetes_validate.latest_version()])
def test_crd_is_a_valid_customresourcedefinition(crd: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(crd, version, strict=True)


def test_names_scope_version_columns_and_status_subresource(crd: dict[str, Any]) -> None:
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "loraresumes.loraresume.dev"
    assert spec["group"] + "/" + spec["versions"][0]["name"] == API_VERSION
    assert spec["names"]["kind"] == KIND
    assert spec["names"]["plural"] == "loraresumes"
    assert spec["names"]["singular"] == "loraresume"
    assert spec["names"]["shortNames"] == ["lr"]
    assert spec["names"]["categories"] == CATEGORIES
    assert spec["scope"] == "Namespaced"
    [version] = spec["versions"]
    assert version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: (c["type"], c["jsonPath"]) for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ("string", ".status.phase")
    assert columns["Progress"] == ("string", ".status.progress")
    assert columns["Loss"] == ("string", ".status.loss")
    assert columns["Preemptions"] == ("integer", ".status.preemptions")
    assert columns["Failures"] == ("integer", ".status.failures")
    assert columns["Age"] == ("date", ".metadata.creationTimestamp")
    status_props = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert columns["Attempt"] == ("integer", ".status.attempt")
    assert columns["Checkpoint"] == ("integer", ".status.latestCheckpoint.step")
    for column in version["additionalPrinterColumns"]:
        if column["jsonPath"].startswith(".status."):
            *parents, leaf = column["jsonPath"].removeprefix(".status.").split(".")
            props = status_props
            for parent in parents:
                props = props[parent]["properties"]
            assert props[leaf]["type"] == column["type"], column


# --- structural schema ----------------------------------------------------------------------


def _refused_key(node: dict[str, Any]) -> bool:
    """A key of spec.training.extra no value may have (crd._extra_schema): schemaless, `not: {}`.
    The API server takes it (a schemaless node needs no type; `not` is a value validation)."""
    return node.get("not") == {} and node.get("x-kubernetes-preserve-unknown-fields") is True and "type" not in node


def test_schema_is_structural(root: dict[str, Any]) -> None:
    problems = []
    for path, node in nodes(root):
        if _refused_key(node):
            continue
        if "type" not in node and not node.get("x-kubernetes-int-or-string"):
            problems.append(f"{path}: no type")
        for key in ("$ref", "$defs", "definitions", "anyOf", "oneOf", "allOf", "not", "uniqueItems", "title"):
            if key in node:
                problems.append(f"{path}: {key}")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{path}: properties beside additionalProperties")
        if node.get("x-kubernetes-preserve-unknown-fields") and node.get("type") != "object":
            problems.append(f"{path}: preserve-unknown-fields without type object")
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            if key in node and not isinstance(node[key], bool):
                problems.append(f"{path}: {key} must be a boolean in OpenAPI v3.0")
        if "enum" in node and any(not isinstance(v, str) for v in node["enum"]):
            problems.append(f"{path}: non-string enum")
    assert problems == []


def test_every_property_has_a_description_for_kubectl_explain(root: dict[str, Any]) -> None:
    missing = [path for path, node in nodes(root) if path != ".metadata" and not node.get("description")]
    # List items and map values of scalars are described by their list or map.
    missing = [p for p, n in nodes(root) if p in missing and (n["type"] == "object" or p[-1] not in "]*")]
    assert missing == []


def test_spec_is_required_and_required_lists_use_the_camelcase_names(root: dict[str, Any]) -> None:
    assert root["required"] == ["spec"]
    spec = root["properties"]["spec"]
    assert spec["required"] == ["baseModel", "dataset"]
    # storage.uri may be left to the operator's default prefix (status.storageUri records it)
    assert "required" not in spec["properties"]["storage"]
    condition = root["properties"]["status"]["properties"]["conditions"]["items"]
    assert set(condition["required"]) >= {"type", "status", "reason", "lastTransitionTime"}
    assert "message" in condition["properties"] and condition["properties"]["message"]["default"] == ""


def test_status_phase_is_an_enum_of_the_phases(root: dict[str, Any]) -> None:
    phase = root["properties"]["status"]["properties"]["phase"]
    assert phase["type"] == "string"
    assert phase["enum"] == ["Pending", "Running", "Resuming", "Suspended", "Succeeded", "Failed"]


# --- the model and the schema agree -----------------------------------------------------------


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def model_fields(model: type[BaseModel], node: dict[str, Any], path: str) -> Iterator[tuple[str, Any, dict]]:
    """(path, FieldInfo, schema node) for every field of `model` and of the models inside it."""
    assert set(node["properties"]) == {f.alias or n for n, f in model.model_fields.items()}, path
    for name, field in model.model_fields.items():
        alias = field.alias or name
        prop = node["properties"][alias]
        yield f"{path}.{alias}", field, prop
        for sub in _models_in(field.annotation):
            inner = prop["items"] if prop["type"] == "array" else prop
            yield from model_fields(sub, inner, f"{path}.{alias}")


@pytest.mark.parametrize("model,part", [(LoraResumeSpec, "spec"), (LoraResumeStatus, "status")])
def test_every_model_default_is_the_crd_default(root: dict[str, Any], model: type[BaseModel], part: str) -> None:
    mismatches = []
    for path, field, prop in model_fields(model, root["properties"][part], part):
        if field.is_required():
            if "default" in prop:
                mismatches.append(f"{path}: required in the model, defaulted in the CRD")
            continue
        default = field.get_default(call_default_factory=True)
        if default is None:
            if "default" in prop:
                mismatches.append(f"{path}: no model default, CRD default {prop['default']!r}")
            continue
        expected = to_jsonable_python(default, by_alias=True, exclude_none=True)
        if "default" not in prop:
            mismatches.append(f"{path}: model default {expected!r} missing from the CRD")
        elif apply_defaults(prop["default"], prop) != expected:
            mismatches.append(f"{path}: model {expected!r} != CRD {apply_defaults(prop['default'], prop)!r}")
    assert mismatches == []


def test_api_server_defaulting_gives_the_models_values(spec_schema: dict[str, Any], root: dict[str, Any]) -> None:
    minimal = {"baseModel": "m", "dataset": {"source": "s3://data/x.jsonl"}, "storage": {"uri": "s3://bucket/p/"}}
    model = LoraResumeSpec.model_validate(minimal).model_dump(by_alias=True, mode="json", exclude_none=True)
    assert apply_defaults(minimal, spec_schema) == model

    status = {
        "phase": "Running",
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "PodRunning", "lastTransitionTime": "2026-01-01T00:00:00Z"}
        ],
    }
    status_schema = root["properties"]["status"]
    model = LoraResumeStatus.model_validate(status).model_dump(by_alias=True, mode="json", exclude_none=True)
    assert apply_defaults(status, status_schema) == model


def test_required_fields_match_the_model(spec_schema: dict[str, Any], root: dict[str, Any]) -> None:
    for model, part in ((LoraResumeSpec, spec_schema), (LoraResumeStatus, root["properties"]["status"])):
        for path, field, prop in model_fields(model, part, model.__name__):
            for sub in _models_in(field.annotation):
                inner = prop["items"] if prop["type"] == "array" else prop
                required = [f.alias or n for n, f in sub.model_fields.items() if f.is_required()]
                assert inner.get("required", []) == required, path


# --- refusals ------------------------------------------------------------------------------------
# (The example resources themselves are checked in tests/examples/test_examples.py.)


def _set(doc: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        doc = doc.setdefault(key, {})
    if value is _DELETE:
        del doc[last]
    else:
        doc[last] = value


class _Delete:
    """The field is removed (a stable repr, so every pytest-xdist worker collects the same ids)."""

    def __repr__(self) -> str:
        return "<deleted>"


_DELETE = _Delete()
# Type errors the model's lax mode would coerce ("100" -> 100, "yes" -> True); the API server refuses them.
COERCED = [("spec.training.maxSteps", "100"), ("spec.loadIn4bit", "yes")]
INVALID = [
    # (field, bad value, path the error names, words in the message)
    ("spec.training.maxSteps", "100", ["spec", "training", "maxSteps"], "is not of type 'integer'"),
    ("spec.training.maxSteps", -5, ["spec", "training", "maxSteps"], "minimum of 1"),
    ("spec.training.learningRate", 0, ["spec", "training", "learningRate"], "minimum of 0"),
    ("spec.lora.dropout", 1.0, ["spec", "lora", "dropout"], "maximum of 1"),
    ("spec.lora.targetModules", [], ["spec", "lora", "targetModules"], "should be non-empty"),
    ("spec.dtype", "int8", ["spec", "dtype"], "is not one of"),
    ("spec.loadIn4bit", "yes", ["spec", "loadIn4bit"], "is not of type 'boolean'"),
    ("spec.storage.uri", "gs://bucket/run/", ["spec", "storage", "uri"], "does not match"),
    ("spec.dataset", _DELETE, ["spec"], "'dataset' is a required property"),
    ("spec.baseModel", "", ["spec", "baseModel"], "should be non-empty"),
    ("spec.resources.memory", "lots", ["spec", "resources", "memory"], "does not match"),
    ("spec.scheduling.nodeSelector", {"pool": 1}, ["spec", "scheduling", "nodeSelector", "pool"], "of type 'string'"),
    ("spec.scheduling.spot.tolerations", [{"effect": "Sometimes"}],
     ["spec", "scheduling", "spot", "tolerations", 0, "effect"], "is not one of"),
    ("spec.terminationGracePeriodSeconds", 1, ["spec", "terminationGracePeriodSeconds"], "minimum of 5"),
    ("spec.adapter.uri", "https://example.com/a", ["spec", "adapter", "uri"], "does not match"),
]  # fmt: skip


@pytest.mark.parametrize("field,value,path,words", INVALID, ids=[f"{f}={v!r}" for f, v, *_ in INVALID])
def test_schema_refuses_invalid_resources(root: dict[str, Any], field: str, value: Any, path: list, words: str) -> None:
    doc = resume_example()
    _set(doc, field, value)
    errors = schema_errors(root, doc)
    assert [(list(e.absolute_path), words in e.message) for e in errors] == [(path, True)], [e.message for e in errors]
    if (field, value) in COERCED:
        LoraResumeSpec.model_validate(doc["spec"])
        return
    # The model refuses it too, naming the same field.
    with pytest.raises(ValidationError) as refused:
        LoraResumeSpec.model_validate(doc["spec"])
    named = field.split(".")[1:] if value is _DELETE else path[1:]
    locs = [list(err["loc"]) for err in refused.value.errors()]
    assert any(loc[: len(named)] == named for loc in locs), locs


# --- CEL rules ------------------------------------------------------------------------------------


def rules_of(node: dict[str, Any]) -> list[dict[str, str]]:
    return node.get("x-kubernetes-validations", [])


@pytest.mark.parametrize("field", IMMUTABLE)
def test_fields_that_define_the_run_are_immutable(spec_schema: dict[str, Any], field: str) -> None:
    rules = rules_of(spec_schema["properties"][field])
    [rule] = [r for r in rules if "oldSelf" in r["rule"]]
    if field == "training":  # typed fields compared; `extra` is held by the operator (test_decide); cadences free
        assert rule["rule"] == training_immutable_rule()
        free = {"extra", *MUTABLE_TRAINING_FIELDS}
        typed = [info.alias for name, info in TrainingSpec.model_fields.items() if name not in free]
        assert all(f"self.{key} == oldSelf.{key}" in rule["rule"] for key in typed) and "extra" not in rule["rule"]
        assert not any(f"self.{camel(key)}" in rule["rule"] for key in MUTABLE_TRAINING_FIELDS)
    else:
        assert rule["rule"] == "self == oldSelf"
    assert rule["message"].startswith(f"{field} is immutable") and "create a new LoraResume" in rule["message"]


STORAGE_TRANSITIONS = [
    ({"uri": "s3://b/run/"}, {"uri": "s3://b/run/", "keepCheckpoints": 5}, True),
    ({"uri": "s3://b/run/"}, {"uri": "s3://b/other/"}, False),
    ({}, {"keepCheckpoints": 5}, True),  # left to the operator's default prefix, and stays so
    ({}, {"uri": "s3://b/run/"}, False),
    ({"uri": "s3://b/run/"}, {}, False),
]


@pytest.mark.parametrize("old,new,allowed", STORAGE_TRANSITIONS)
def test_storage_uri_is_immutable_set_or_unset(
    spec_schema: dict[str, Any], old: dict, new: dict, allowed: bool
) -> None:
    celpy = pytest.importorskip("celpy", reason="cel-python evaluates the CEL rules when installed")
    [rule] = rules_of(spec_schema["properties"]["storage"])
    assert "storage.uri" in rule["message"] and "create a new LoraResume" in rule["message"]
    env = celpy.Environment()
    result = env.program(env.compile(rule["rule"])).evaluate(
        {"self": celpy.json_to_cel(new), "oldSelf": celpy.json_to_cel(old)}
    )
    assert bool(result) == allowed


def test_adapter_cannot_be_added_or_removed(spec_schema: dict[str, Any]) -> None:
    [rule] = [r for r in rules_of(spec_schema) if "oldSelf" in r["rule"]]
    assert rule["rule"] == "has(self.adapter) == has(oldSelf.adapter)"
    assert "create a new LoraResume" in rule["message"]


@pytest.mark.parametrize("field", LIVE)
def test_fields_edited_live_have_no_transition_rules(spec_schema: dict[str, Any], field: str) -> None:
    for path, node in nodes(spec_schema["properties"][field], field):
        assert not [r for r in rules_of(node) if "oldSelf" in r["rule"]], path


@pytest.mark.parametrize("field,a,b", [("dataset", "source", "name"), ("adapter", "uri", "fromResource")])
def test_exactly_one_source_rules_name_the_fields(spec_schema: dict[str, Any], field: str, a: str, b: str) -> None:
    [rule] = [r for r in rules_of(spec_schema["properties"][field]) if "oldSelf" not in r["rule"]]
    assert f"has(self.{a})" in rule["rule"] and f"has(self.{b})" in rule["rule"]
    assert f"{field}.{a}" in rule["message"] and f"{field}.{b}" in rule["message"]


ONE_OF_CASES = [
    ("dataset", {"source": "s3://data/x.jsonl"}),
    ("dataset", {"name": "yahma/alpaca-cleaned"}),
    ("dataset", {"source": "s3://data/x.jsonl", "name": "yahma/alpaca-cleaned"}),
    ("dataset", {}),
    ("dataset", {"source": "", "name": "yahma/alpaca-cleaned"}),
    ("adapter", {"uri": "s3://artifacts/a/"}),
    ("adapter", {"fromResource": "stage-1"}),
    ("adapter", {"uri": "s3://artifacts/a/", "fromResource": "stage-1"}),
    ("adapter", {}),
]


@pytest.mark.parametrize("field,value", ONE_OF_CASES)
def test_cel_exactly_one_rules_agree_with_the_model(spec_schema: dict[str, Any], field: str, value: dict) -> None:
    celpy = pytest.importorskip("celpy", reason="cel-python evaluates the CEL rules when installed")
    spec = {"baseModel": "m", "dataset": {"source": "s3://data/x.jsonl"}, "storage": {"uri": "s3://bucket/p/"}}
    spec[field] = value
    try:
        LoraResumeSpec.model_validate(spec)
        model_ok = True
    except ValidationError:
        model_ok = False
    env = celpy.Environment()
    [rule] = [r for r in rules_of(spec_schema["properties"][field]) if "oldSelf" not in r["rule"]]
    cel_ok = env.program(env.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(value)})
    assert bool(cel_ok) == model_ok


# --- the generator refuses what a structural schema cannot say -----------------------------------


class _Union(BaseModel):
    value: int | str = 1


class _Set(BaseModel):
    tags: set[str] = set()


class _FreeForm(BaseModel):
    anything: dict[str, Any] = {}


class _NullNotAbsent(BaseModel):
    limit: int | None = 5


@pytest.mark.parametrize("model", [_Union, _Set, _FreeForm, _NullNotAbsent])
def test_generator_refuses_unstructural_models(model: type[BaseModel]) -> None:
    with pytest.raises(UnsupportedSchema):
        openapi_schema(model)


def test_main_prints_the_rendered_crd(capsys: pytest.CaptureFixture[str]) -> None:
    crd_module.main()
    assert capsys.readouterr().out == render_crd()
