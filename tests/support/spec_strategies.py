"""Hypothesis strategies for LoraResume resources, derived from the pydantic models in spec.py.

`model_docs(Model)` walks a model's fields (annotation + constraints: ge/gt/le/lt, lengths,
patterns, Literals, nested models, lists, maps) and draws camelCase documents as a person
would write them in YAML. A few fields carry rules a field-level walk cannot know (the
model validators: exactly one adapter/dataset source, a template that is a format string);
those get hand-written strategies in OVERRIDES. `valid_specs()` keeps only what the model
accepts, so it is the model's own notion of valid, not a copy of it.

`mutations(schema, doc)` turns a valid resource into an invalid-looking one by one edit at a
path the CRD schema knows, and says which field path a good error message must name.
"""

from __future__ import annotations

import copy
import string
import types
import typing
from dataclasses import dataclass
from typing import Any

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from loraresume_operator.spec import S3_URI_PATTERN, AdapterSource, LoraResumeSpec, TrainingSpec
from loraresume_trainer.config import DatasetSettings
from loraresume_trainer.s3uri import S3Uri
from tests.support.specs import resource

INT64_MAX = 2**63 - 1  # the API server's integer range
INT64_MIN = -(2**63)
FLOAT_LIMIT = 1e15

# ---------------------------------------------------------------------------------- leaves


def s3_uris(*, parseable: bool = True) -> st.SearchStrategy[str]:
    """URIs matching the CRD's/model's pattern; `parseable` also requires S3Uri.parse to take them
    (the pattern is weaker: it lets `my..bucket` and `bucket//key` through; the model does not)."""
    typical = st.builds(
        lambda bucket, parts, slash: f"s3://{bucket}/" + "/".join(parts) + ("/" if slash and parts else ""),
        st.from_regex(r"\A[a-z0-9][a-z0-9-]{1,20}[a-z0-9]\Z"),
        st.lists(st.from_regex(r"\A[A-Za-z0-9_.-]{1,12}\Z").filter(lambda s: s not in (".", "..")), max_size=3),
        st.booleans(),
    )
    anything = st.from_regex(S3_URI_PATTERN, fullmatch=True)
    uris = st.one_of(typical, anything)
    if parseable:
        uris = uris.filter(_parses)
    return uris


def _parses(uri: str) -> bool:
    try:
        S3Uri.parse(uri)
    except ValueError:
        return False
    return True


_NAME = st.from_regex(r"\A[a-z0-9]([-a-z0-9.]{0,20}[a-z0-9])?\Z")
_DNS_SUBDOMAIN = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,10}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,10}[a-z0-9])?){0,2}\Z")
_LABEL_NAME = st.from_regex(r"\A[A-Za-z0-9]([-A-Za-z0-9_.]{0,20}[A-Za-z0-9])?\Z")
_LABEL_KEY = st.one_of(_LABEL_NAME, st.builds(lambda p, n: f"{p}/{n}", _DNS_SUBDOMAIN, _LABEL_NAME))
_LABEL_VALUE = st.one_of(st.just(""), _LABEL_NAME)
_SELECTOR = st.dictionaries(_LABEL_KEY, _LABEL_VALUE, max_size=3)
_IDENT = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,10}\Z")
_SHORT_TEXT = st.text(max_size=24)

# SFTConfig fields a user may put in training.extra (none typed, none reserved: spec.extra_refusals).
_EXTRA = st.dictionaries(
    st.sampled_from(["max_grad_norm", "warmup_ratio", "adam_beta2", "dataloader_num_workers", "packing"]),
    st.one_of(st.floats(0, 10, allow_nan=False), st.integers(0, 8), st.booleans()),
    max_size=2,
)
_AFFINITY = st.one_of(
    st.just({}),
    st.just(
        {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100", "h200"]}]}
                    ]
                }
            }
        }
    ),
)


def _templates() -> st.SearchStrategy[str]:
    custom = st.lists(_IDENT, min_size=1, max_size=3).map(
        lambda names: "\n".join(f"{n.upper()}: {{{n}}}" for n in names)
    )
    return st.one_of(st.sampled_from(["alpaca", "chat"]), custom)


def _dataset(parseable: bool) -> st.SearchStrategy[dict[str, Any]]:
    common = {
        "split": st.sampled_from(["train", "validation", "train[:90%]"]),
        "format": st.sampled_from(["jsonl", "json", "parquet", "csv"]),
        "template": _templates(),
        "messagesColumn": _IDENT,
    }
    by_source = st.fixed_dictionaries(
        {"source": st.one_of(s3_uris(parseable=parseable), st.sampled_from(["/data/train.jsonl", "rows.csv"]))},
        optional=common,
    )
    by_name = st.fixed_dictionaries({"name": st.sampled_from(["yahma/alpaca-cleaned", "org/set"])}, optional=common)
    return st.one_of(by_source, by_name)


def _adapter(parseable: bool) -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(
        st.fixed_dictionaries({"uri": s3_uris(parseable=parseable)}),
        st.fixed_dictionaries({"fromResource": _NAME.filter(lambda n: len(n) <= 253)}),
    )


def _tolerations() -> st.SearchStrategy[list[dict[str, Any]]]:
    """core/v1 tolerations as the API server takes them (the model checks the same rules)."""
    effect = st.sampled_from(["NoSchedule", "PreferNoSchedule", "NoExecute"])
    exists = st.fixed_dictionaries({"operator": st.just("Exists")}, optional={"key": _LABEL_KEY, "effect": effect})
    equal = st.fixed_dictionaries(
        {"key": _LABEL_KEY}, optional={"operator": st.just("Equal"), "value": _LABEL_VALUE, "effect": effect}
    )
    evict_after = st.builds(
        lambda t, s: {**t, "effect": "NoExecute", "tolerationSeconds": s},
        st.one_of(exists, equal),
        st.integers(0, 3600),
    )
    return st.lists(st.one_of(exists, equal, evict_after), max_size=3)


# (model, field name) -> strategy, for what a field walk cannot derive.
def _overrides(parseable: bool) -> dict[tuple[type, str] | type, st.SearchStrategy[Any]]:
    return {
        AdapterSource: _adapter(parseable),
        DatasetSettings: _dataset(parseable),
        (TrainingSpec, "extra"): _EXTRA,
        (TrainingSpec, "optim"): st.sampled_from(["adamw_8bit", "adamw_torch", "sgd", "x"]),
        (TrainingSpec, "lr_scheduler_type"): st.sampled_from(["linear", "cosine", "constant"]),
        ("SchedulingSpec", "affinity"): _AFFINITY,
        ("SchedulingSpec", "node_selector"): _SELECTOR,
        ("SchedulingSpec", "tolerations"): _tolerations(),
        ("SchedulingSpec", "priority_class_name"): _DNS_SUBDOMAIN,
        ("SpotSpec", "node_selector"): _SELECTOR,
        ("SpotSpec", "on_demand_node_selector"): _SELECTOR,
        ("SpotSpec", "tolerations"): _tolerations(),
        ("LoraResumeSpec", "service_account_name"): _DNS_SUBDOMAIN,
        ("StorageSpec", "uri"): s3_uris(parseable=parseable),
        ("StorageSpec", "endpoint"): st.sampled_from(["", "http://127.0.0.1:9000", "https://s3.example.com"]),
    }


# ---------------------------------------------------------------------------- the field walk


@dataclass(frozen=True)
class Bounds:
    ge: Any = None
    gt: Any = None
    le: Any = None
    lt: Any = None
    min_length: int | None = None
    max_length: int | None = None
    pattern: str | None = None


def bounds(metadata: list[Any]) -> Bounds:
    found: dict[str, Any] = {}
    for item in metadata:
        for cls, key in (
            (Ge, "ge"),
            (Gt, "gt"),
            (Le, "le"),
            (Lt, "lt"),
            (MinLen, "min_length"),
            (MaxLen, "max_length"),
        ):
            if isinstance(item, cls):
                found[key] = getattr(item, key)
        if getattr(item, "pattern", None):
            found["pattern"] = item.pattern
    return Bounds(**found)


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def value_strategy(annotation: Any, b: Bounds, overrides: dict) -> st.SearchStrategy[Any]:
    annotation, _ = _unwrap(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return model_docs(annotation, overrides)
    if origin is typing.Literal:
        return st.sampled_from(list(args))
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        lo = b.ge if b.ge is not None else (b.gt + 1 if b.gt is not None else INT64_MIN)
        hi = b.le if b.le is not None else (b.lt - 1 if b.lt is not None else INT64_MAX)
        return st.integers(lo, hi)
    if annotation is float:
        lo = b.ge if b.ge is not None else b.gt
        hi = b.le if b.le is not None else b.lt
        return st.floats(
            min_value=-FLOAT_LIMIT if lo is None else lo,
            max_value=FLOAT_LIMIT if hi is None else hi,
            exclude_min=b.gt is not None,
            exclude_max=b.lt is not None,
            allow_nan=False,
            allow_infinity=False,
        )
    if annotation is str:
        if b.pattern:
            return st.from_regex(b.pattern, fullmatch=True)
        return st.text(min_size=b.min_length or 0, max_size=max(b.min_length or 0, b.max_length or 24))
    if origin is dict:
        return st.dictionaries(
            st.text(min_size=1, max_size=16), value_strategy(args[1], Bounds(), overrides), max_size=3
        )
    if origin in (list, tuple):
        item = args[0]
        return st.lists(
            value_strategy(item, Bounds(), overrides)
            if item is not str
            else st.text(string.ascii_lowercase + "_", min_size=1, max_size=10),
            min_size=b.min_length or 0,
            max_size=3,
        )
    raise NotImplementedError(f"no strategy for {annotation!r}")


def model_docs(model: type[BaseModel], overrides: dict | None = None) -> st.SearchStrategy[dict[str, Any]]:
    """camelCase documents for `model`: required fields always, optional ones sometimes (None too)."""
    overrides = _overrides(True) if overrides is None else overrides
    if model in overrides:
        return overrides[model]
    required: dict[str, st.SearchStrategy[Any]] = {}
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for name, field in model.model_fields.items():
        key = field.alias or name
        strategy = overrides.get((model, name))
        if strategy is None:
            strategy = overrides.get((model.__name__, name))
        if strategy is None:
            strategy = value_strategy(field.annotation, bounds(field.metadata), overrides)
        if _unwrap(field.annotation)[1]:
            strategy = st.one_of(strategy, st.none())  # explicit null: pruned by the API server
        (required if field.is_required() else optional)[key] = strategy
    return st.fixed_dictionaries(required, optional=optional)


def model_accepts(spec: dict[str, Any]) -> bool:
    try:
        LoraResumeSpec.model_validate(spec)
    except ValidationError:
        return False
    return True


def valid_specs(*, parseable: bool = True) -> st.SearchStrategy[dict[str, Any]]:
    """Spec documents the model accepts. `parseable=False` also draws S3 URIs that match the CRD's
    pattern but not S3Uri.parse (the model refuses those: they are filtered out again here)."""
    return model_docs(LoraResumeSpec, _overrides(parseable)).filter(model_accepts)


# ---------------------------------------------------------------------------------- mutations

Path = tuple[Any, ...]


def schema_paths(value: Any, node: dict[str, Any], path: Path = ()) -> list[tuple[Path, dict[str, Any], Any]]:
    """(path, schema node, value) for every value in `value` the schema describes (not free-form content)."""
    out = [(path, node, value)]
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return out
    if isinstance(value, dict):
        props = node.get("properties")
        extra = node.get("additionalProperties")
        for key, item in value.items():
            if props is not None and key in props:
                out += schema_paths(item, props[key], (*path, key))
            elif isinstance(extra, dict):
                out += schema_paths(item, extra, (*path, key))
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for i, item in enumerate(value):
            out += schema_paths(item, node["items"], (*path, i))
    return out


def dotted(path: Path) -> str:
    """A path as the API server names it: spec.a.b[0].c"""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def model_loc(path: Path) -> str:
    """A path below spec as format_validation_error names it: a.b.0.c"""
    return ".".join(str(p) for p in path[1:])


@dataclass(frozen=True)
class Mutation:
    kind: str
    path: Path  # the field a good message names
    doc: dict[str, Any]  # the whole resource after the edit

    def __repr__(self) -> str:  # hypothesis prints this for a falsifying example
        return f"Mutation({self.kind} at {dotted(self.path)}: {self.doc['spec']!r})"


def _wrong_type(node: dict[str, Any]) -> st.SearchStrategy[Any]:
    kind = node.get("type")
    pool = {
        "string": st.one_of(st.integers(-5, 5), st.booleans(), st.just([]), st.just({"a": 1})),
        "integer": st.one_of(
            st.sampled_from(["7", "1e3", "many"]),
            st.floats(0.5, 9.5).filter(lambda f: f != int(f)),
            st.booleans(),
            st.just([1]),
        ),
        "number": st.one_of(st.sampled_from(["0.1", "fast"]), st.booleans(), st.just({})),
        "boolean": st.one_of(st.sampled_from(["yes", "true", "1"]), st.integers(0, 1), st.just([])),
        "object": st.one_of(st.sampled_from(["x", ""]), st.integers(), st.just([{"a": 1}])),
        "array": st.one_of(st.sampled_from(["a,b"]), st.integers(), st.just({"0": "x"})),
    }
    return pool.get(kind, st.just(object))


def _out_of_range(node: dict[str, Any]) -> st.SearchStrategy[Any] | None:
    options = []
    step = 1 if node.get("type") == "integer" else 1e-9
    if "minimum" in node:
        low = node["minimum"]
        options.append(st.just(low if node.get("exclusiveMinimum") else low - step))
        options.append(st.integers(-(10**6), int(low) - 1) if node.get("type") == "integer" else st.just(low - 1.0))
    if "maximum" in node:
        high = node["maximum"]
        options.append(st.just(high if node.get("exclusiveMaximum") else high + step))
        if node.get("type") == "integer":
            options.append(st.integers(int(high) + 1, INT64_MAX))
    if "minLength" in node and node["minLength"] > 0:
        options.append(st.just(""))
    if "maxLength" in node:
        options.append(st.just("a" * (node["maxLength"] + 1)))
    if "minItems" in node and node["minItems"] > 0:
        options.append(st.just([]))
    return st.one_of(options) if options else None


_BAD_PATTERN_VALUES = [
    "",
    "NOT VALID",
    "gs://bucket/x",
    "s3://B/x",
    "48 Gi",
    "-x-",
    "a_b",
    "s3://bucket/x\nmore",
    "https://example.com/a",
    "s3:/x",
    "x" * 300,
]


MUTATION_KINDS = (
    "wrong-type",
    "null",
    "unknown-field",
    "missing-required",
    "range",
    "pattern",
    "enum",
    "one-of",
    "template",
    "bucket",
    "label",
    "toleration",
    "dns-name",
)


def mutations(
    schema: dict[str, Any], spec: dict[str, Any], kinds: tuple[str, ...] = MUTATION_KINDS
) -> st.SearchStrategy[Mutation]:
    """One edit of a valid spec, at a path the CRD schema describes."""
    doc = resource(copy.deepcopy(spec))
    spec_node = schema["properties"]["spec"]
    targets = [(("spec", *p), n, v) for p, n, v in schema_paths(doc["spec"], spec_node)]

    @st.composite
    def one(draw: st.DrawFn) -> Mutation:
        path, node, value = draw(st.sampled_from(targets))
        out = copy.deepcopy(doc)
        parent = out
        for part in path[:-1]:
            parent = parent[part]
        last = path[-1]
        kind = draw(st.sampled_from(kinds))
        if kind == "wrong-type" and len(path) > 1:
            parent[last] = draw(_wrong_type(node))
            return Mutation(kind, path, out)
        if kind == "null" and len(path) > 1:
            parent[last] = None
            return Mutation(kind, path, out)
        if (
            kind == "unknown-field"
            and isinstance(value, dict)
            and "properties" in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            field = draw(st.sampled_from(["bogus", "maxsteps", "uri_", "Spec", "learning_rate"]))
            if field not in node["properties"]:
                parent[last][field] = draw(st.one_of(st.integers(), st.text(max_size=5)))
                return Mutation(kind, (*path, field), out)
        if kind == "missing-required" and isinstance(value, dict) and node.get("required"):
            field = draw(st.sampled_from(node["required"]))
            parent[last].pop(field, None)
            return Mutation(kind, (*path, field), out)
        if kind == "range" and len(path) > 1:
            bad = _out_of_range(node)
            if bad is not None:
                parent[last] = draw(bad)
                return Mutation(kind, path, out)
        if kind == "pattern" and "pattern" in node:
            parent[last] = draw(st.sampled_from(_BAD_PATTERN_VALUES))
            return Mutation(kind, path, out)
        if kind == "enum" and "enum" in node:
            parent[last] = draw(
                st.sampled_from(["", "auto ", "none", "NoSchedule2", "Sometimes", "always"]).filter(
                    lambda v: v not in node["enum"]
                )
            )
            return Mutation(kind, path, out)
        if kind == "one-of":
            which = draw(st.sampled_from(["adapter", "dataset"]))
            a, b = ("uri", "fromResource") if which == "adapter" else ("source", "name")
            value = draw(st.sampled_from(["both", "neither", "empty-string"]))
            section = {
                "both": {a: "s3://bucket/a/" if a == "uri" else "/d.jsonl", b: "x"},
                "neither": {},
                "empty-string": {a: "", b: ""},
            }[value]
            out["spec"][which] = section
            return Mutation(f"one-of-{value}", ("spec", which), out)
        if kind == "template":
            bad = draw(st.sampled_from(["shakespeare", "{0}", "{a.b}", "{", "no fields", "{x[0]}"]))
            out["spec"].setdefault("dataset", {"source": "/d.jsonl"})["template"] = bad
            return Mutation(kind, ("spec", "dataset", "template"), out)
        if kind == "bucket":
            bad = draw(
                st.sampled_from(
                    [
                        "s3://my..bucket/run/",
                        "s3://bucket//run/",
                        "s3://bucket/a/../b/",
                        "s3://192.168.1.1/run/",
                        "s3://a.-b/run/",
                    ]
                )
            )
            out["spec"].setdefault("storage", {})["uri"] = bad
            return Mutation(kind, ("spec", "storage", "uri"), out)
        if kind == "label":
            where = draw(
                st.sampled_from(
                    [
                        ("scheduling", "nodeSelector"),
                        ("scheduling", "spot", "nodeSelector"),
                        ("scheduling", "spot", "onDemandNodeSelector"),
                    ]
                )
            )
            bad = draw(
                st.sampled_from(
                    [
                        {"gpu type": "h100"},
                        {"gpu": "h100 sxm"},
                        {"a/b/c": "x"},
                        {"x": "v" * 64},
                        {"-lead": "x"},
                        {"/name": "x"},
                        {"Bad_Prefix/x": "y"},
                    ]
                )
            )
            section = out["spec"]
            for part in where[:-1]:
                section = section.setdefault(part, {})
            section[where[-1]] = bad
            return Mutation(kind, ("spec", *where), out)
        if kind == "toleration":
            bad = draw(
                st.sampled_from(
                    [
                        {"key": "k", "operator": "Exists", "value": "v"},
                        {"operator": "Equal"},
                        {"key": "k", "tolerationSeconds": 5},
                        {"key": "bad key"},
                        {"key": "k", "value": "bad value"},
                        {"value": "v"},
                    ]
                )
            )
            out["spec"].setdefault("scheduling", {})["tolerations"] = [bad]
            return Mutation(kind, ("spec", "scheduling", "tolerations", 0), out)
        if kind == "dns-name":
            field = draw(st.sampled_from([("serviceAccountName",), ("scheduling", "priorityClassName")]))
            value = draw(st.sampled_from(["Trainer_SA", "High Priority", "-x", "a..b", "x" * 254]))
            section = out["spec"]
            for part in field[:-1]:
                section = section.setdefault(part, {})
            section[field[-1]] = value
            return Mutation(kind, ("spec", *field), out)
        # Fallback when the drawn edit does not apply here: an unknown top-level spec field.
        out["spec"]["unknownField"] = 1
        return Mutation("unknown-field", ("spec", "unknownField"), out)

    return one()
