"""The Helm chart, rendered and linted by Helm's own Go engine (helm-python-sdk), every object
checked against the official Kubernetes schemas (kubernetes-validate), the RBAC compared with
the operator's rbac.py, and the values schema exercised with values it must refuse.

No cluster is involved: this proves the chart renders to valid objects with the intended
content, not that the operator runs on a real cluster.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from loraresume_operator.rbac import policy_rules

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "helm" / "loraresume-operator"
CRD_SOURCE = ROOT / "crds" / "loraresume.dev_loraresumes.yaml"
CRD_COPY = CHART_DIR / "files" / "loraresume.dev_loraresumes.yaml"
RELEASE, NAMESPACE = "lr", "ml"
FULLNAME = "lr-loraresume-operator"

# The chart's kubeVersion floor and the newest Kubernetes kubernetes-validate knows.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
NOT_CORE_KINDS = {"ServiceMonitor"}  # prometheus-operator's CRD: no official schema to check against

SPOT_TOLERATIONS = [
    {"key": "eks.amazonaws.com/capacityType", "operator": "Equal", "value": "SPOT", "effect": "NoSchedule"},
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
]

# Everything switched away from its default: cluster-wide, ServiceMonitor on, CRDs off,
# workload identity annotation, spot and storage defaults, scheduling of the operator pod.
NON_DEFAULT: dict[str, Any] = {
    "image": {"repository": "registry.example.com/ml/loraresume-operator", "tag": "0.1.1", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "watch": {"clusterWide": True},
    "crds": {"install": False},
    "serviceAccount": {
        "name": "loraresume",
        "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/loraresume-operator"},
    },
    "logLevel": "DEBUG",
    "reconcileIntervalSeconds": 2.5,
    "trainer": {
        "image": "registry.example.com/ml/trainer:0.1.1",
        "pullPolicy": "Always",
        "terminationGracePeriodSeconds": 110,
    },
    "storage": {
        "uriPrefix": "s3://ml-checkpoints/loraresume/",
        "endpoint": "https://minio.storage.svc:9000",
        "region": "eu-central-1",
        "credentialsSecret": "s3-creds",
    },
    "spot": {
        "nodeSelector": {"eks.amazonaws.com/capacityType": "SPOT"},
        "tolerations": SPOT_TOLERATIONS,
        "onDemandNodeSelector": {"eks.amazonaws.com/capacityType": "ON_DEMAND"},
    },
    "policy": {
        "allowedImages": ["registry.example.com/ml/", "ghcr.io/org/trainer"],
        "allowedServiceAccounts": ["trainer-irsa"],
        "requireCredentialsLabel": False,
    },
    "metrics": {
        "port": 9090,
        "serviceType": "ClusterIP",
        "serviceAnnotations": {"prometheus.io/scrape": "true"},
        "serviceMonitor": {
            "enabled": True,
            "interval": "15s",
            "scrapeTimeout": "10s",
            "labels": {"release": "kube-prometheus-stack"},
        },
    },
    "liveness": {
        "port": 9091,
        "initialDelaySeconds": 5,
        "periodSeconds": 10,
        "timeoutSeconds": 2,
        "failureThreshold": 6,
    },
    "resources": {"requests": {"cpu": "200m", "memory": "300Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
    "podAnnotations": {"example.com/owner": "ml-platform"},
    "podLabels": {"team": "ml"},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "system", "effect": "NoSchedule"}],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64", "arm64"]}
                        ]
                    }
                ]
            }
        }
    },
    "priorityClassName": "system-cluster-critical",
}
MULTI_NAMESPACE: dict[str, Any] = {"watch": {"namespaces": ["team-a", "team-b", "team-c"]}}
VALUE_SETS = {"default": {}, "non_default": NON_DEFAULT, "multi_namespace": MULTI_NAMESPACE}


# --- helpers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def render_text(chart: helm.Chart, values: dict[str, Any] | None = None) -> dict[str, str]:
    """Template path (without the chart-name prefix) -> rendered text."""
    rendered = chart.render(copy.deepcopy(values or {}), name=RELEASE, namespace=NAMESPACE, is_install=True)
    return {path.split("/", 1)[1]: text for path, text in rendered.items()}


def render(chart: helm.Chart, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every rendered object (NOTES.txt excluded)."""
    objects: list[dict[str, Any]] = []
    for path, text in sorted(render_text(chart, values).items()):
        if path.endswith("NOTES.txt"):
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def only(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = only(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def operator_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    """The operator settings (LORARESUME_*) the container gets."""
    env = container(objects)["env"]
    names = [e["name"] for e in env]
    assert len(names) == len(set(names)), f"duplicate env vars: {names}"
    return {e["name"]: e["value"] for e in env if e["name"].startswith("LORARESUME_")}


def rule_triples(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def assert_rules_match(rules: list[dict[str, Any]], cluster_wide: bool) -> None:
    rendered, expected = rule_triples(rules), rule_triples(policy_rules(cluster_wide))
    assert rendered == expected, (
        "the chart's RBAC (helm/loraresume-operator/templates/_helpers.tpl, namespacedRules/clusterRules) "
        f"differs from operator/loraresume_operator/rbac.py: missing {sorted(expected - rendered)}, "
        f"extra {sorted(rendered - expected)}"
    )


def merged(*parts: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


# --- lint and official schemas --------------------------------------------------------------


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_helm_lint_passes(values: dict[str, Any]) -> None:
    report = helm.lint(CHART_DIR, copy.deepcopy(values), strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_object_passes_the_official_schema(chart: helm.Chart, values: dict[str, Any], k8s_version: str) -> None:
    objects = render(chart, values)
    assert objects
    for obj in objects:
        if obj["kind"] in NOT_CORE_KINDS:
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        # strict: unknown fields are errors too (the CRD is checked as apiextensions.k8s.io/v1)
        kubernetes_validate.validate(obj, k8s_version, strict=True)


@pytest.mark.parametrize(
    ("values", "kinds"),
    [
        ({}, ["CustomResourceDefinition", "Deployment", "Role", "RoleBinding", "Service", "ServiceAccount"]),
        (
            NON_DEFAULT,
            ["ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ServiceAccount", "ServiceMonitor"],
        ),
        (
            MULTI_NAMESPACE,
            [
                "CustomResourceDefinition",
                "Deployment",
                "Role",
                "Role",
                "Role",
                "RoleBinding",
                "RoleBinding",
                "RoleBinding",
                "Service",
                "ServiceAccount",
            ],
        ),
        (
            {"serviceAccount": {"create": False, "name": "existing"}, "crds": {"keep": False}},
            ["CustomResourceDefinition", "Deployment", "Role", "RoleBinding", "Service"],
        ),
    ],
    ids=["default", "non_default", "multi_namespace", "existing_service_account"],
)
def test_rendered_kinds(chart: helm.Chart, values: dict[str, Any], kinds: list[str]) -> None:
    assert sorted(o["kind"] for o in render(chart, values)) == kinds


# --- operator settings (environment contract) ------------------------------------------------


def test_default_env_has_defaults_and_omits_empty_settings(chart: helm.Chart) -> None:
    env = operator_env(render(chart))
    assert env == {
        "LORARESUME_TRAINER_IMAGE": "ghcr.io/loraresume/trainer:0.1.0",
        "LORARESUME_IMAGE_PULL_POLICY": "IfNotPresent",
        "LORARESUME_GRACE_PERIOD_SECONDS": "120",
        "LORARESUME_REQUIRE_CREDENTIALS_LABEL": "true",
        "LORARESUME_LOG_LEVEL": "INFO",
        "LORARESUME_METRICS_PORT": "8080",
        "LORARESUME_RECONCILE_INTERVAL": "10",
    }


def test_non_default_env_matches_values(chart: helm.Chart) -> None:
    env = operator_env(render(chart, NON_DEFAULT))
    v = NON_DEFAULT
    assert {k: val for k, val in env.items() if not k.startswith(("LORARESUME_SPOT", "LORARESUME_ON_DEMAND"))} == {
        "LORARESUME_TRAINER_IMAGE": v["trainer"]["image"],
        "LORARESUME_IMAGE_PULL_POLICY": v["trainer"]["pullPolicy"],
        "LORARESUME_GRACE_PERIOD_SECONDS": "110",
        "LORARESUME_STORAGE_URI_PREFIX": v["storage"]["uriPrefix"],
        "LORARESUME_S3_ENDPOINT": v["storage"]["endpoint"],
        "LORARESUME_S3_REGION": v["storage"]["region"],
        "LORARESUME_CREDENTIALS_SECRET": v["storage"]["credentialsSecret"],
        "LORARESUME_ALLOWED_IMAGES": json.dumps(v["policy"]["allowedImages"], separators=(",", ":")),
        "LORARESUME_ALLOWED_SERVICE_ACCOUNTS": json.dumps(v["policy"]["allowedServiceAccounts"]),
        "LORARESUME_REQUIRE_CREDENTIALS_LABEL": "false",
        "LORARESUME_LOG_LEVEL": "DEBUG",
        "LORARESUME_METRICS_PORT": "9090",
        "LORARESUME_RECONCILE_INTERVAL": "2.5",
    }
    # JSON settings parse back to the values exactly.
    assert json.loads(env["LORARESUME_SPOT_NODE_SELECTOR"]) == v["spot"]["nodeSelector"]
    assert json.loads(env["LORARESUME_SPOT_TOLERATIONS"]) == SPOT_TOLERATIONS
    assert json.loads(env["LORARESUME_ON_DEMAND_NODE_SELECTOR"]) == v["spot"]["onDemandNodeSelector"]


@pytest.mark.parametrize(
    ("values", "name", "expected"),
    [
        ({"spot": {"tolerations": [{"operator": "Exists"}]}}, "LORARESUME_SPOT_TOLERATIONS", [{"operator": "Exists"}]),
        (
            {"spot": {"tolerations": [{"key": "k", "effect": "NoExecute", "tolerationSeconds": 30}]}},
            "LORARESUME_SPOT_TOLERATIONS",
            [{"key": "k", "effect": "NoExecute", "tolerationSeconds": 30}],
        ),
        (
            {"spot": {"nodeSelector": {"cloud.google.com/gke-spot": "true"}}},
            "LORARESUME_SPOT_NODE_SELECTOR",
            {"cloud.google.com/gke-spot": "true"},
        ),
        (
            {"spot": {"onDemandNodeSelector": {"pool": "gpu-on-demand"}}},
            "LORARESUME_ON_DEMAND_NODE_SELECTOR",
            {"pool": "gpu-on-demand"},
        ),
    ],
    ids=["toleration_exists", "toleration_seconds", "gke_spot_selector", "on_demand_selector"],
)
def test_json_settings_round_trip(chart: helm.Chart, values: dict[str, Any], name: str, expected: Any) -> None:
    env = operator_env(render(chart, values))
    assert json.loads(env[name]) == expected
    spot_settings = {
        "LORARESUME_SPOT_TOLERATIONS",
        "LORARESUME_SPOT_NODE_SELECTOR",
        "LORARESUME_ON_DEMAND_NODE_SELECTOR",
    }
    others = spot_settings - {name}
    assert not others & env.keys(), "empty spot settings must be left out"


def _value_at(values: dict[str, Any], dotted: str) -> Any:
    node: Any = merged(yaml.safe_load((CHART_DIR / "values.yaml").read_text()), values)
    for key in dotted.split("."):
        node = node[key]
    return node


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_operator_parses_the_rendered_settings(chart: helm.Chart, values: dict[str, Any]) -> None:
    """The operator's own parser (defaults.OperatorDefaults.from_env) accepts what the chart renders,
    and each variable comes from the Helm value the operator names in its error messages."""
    from loraresume_operator.defaults import ENV, OperatorDefaults

    env = operator_env(render(chart, values))
    for name, dotted in ENV.items():
        value = _value_at(values, dotted)
        if value in ("", {}, [], None):
            assert name not in env, f"{name} rendered for an empty {dotted}"
        elif isinstance(value, (dict, list)):
            assert json.loads(env[name]) == value, name
        elif isinstance(value, bool):
            assert env[name] == str(value).lower(), name
        else:
            assert env[name] == str(value), name
    parsed = OperatorDefaults.from_env(env)
    assert parsed.trainer_image == _value_at(values, "trainer.image")
    assert parsed.image_pull_policy == _value_at(values, "trainer.pullPolicy")
    assert parsed.grace_period_seconds == _value_at(values, "trainer.terminationGracePeriodSeconds")
    assert parsed.storage_uri_prefix == (_value_at(values, "storage.uriPrefix") or None)
    assert parsed.storage_endpoint == (_value_at(values, "storage.endpoint") or None)
    assert parsed.storage_region == (_value_at(values, "storage.region") or None)
    assert parsed.credentials_secret == (_value_at(values, "storage.credentialsSecret") or None)
    assert dict(parsed.spot_node_selector) == _value_at(values, "spot.nodeSelector")
    assert dict(parsed.on_demand_node_selector) == _value_at(values, "spot.onDemandNodeSelector")
    assert [t.model_dump(by_alias=True, exclude_none=True) for t in parsed.spot_tolerations] == _value_at(
        values, "spot.tolerations"
    )
    assert list(parsed.policy.allowed_images) == _value_at(values, "policy.allowedImages")
    assert list(parsed.policy.allowed_service_accounts) == _value_at(values, "policy.allowedServiceAccounts")
    assert parsed.policy.require_credentials_label is _value_at(values, "policy.requireCredentialsLabel")


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_operator_cli_accepts_the_rendered_args(chart: helm.Chart, values: dict[str, Any]) -> None:
    from loraresume_operator.cli import _parser

    c = container(render(chart, values))
    assert c["command"] == ["loraresume-operator"]
    args = _parser().parse_args(c["args"])
    assert args.all_namespaces is _value_at(values, "watch.clusterWide")
    assert args.namespace == ([] if args.all_namespaces else (_value_at(values, "watch.namespaces") or [NAMESPACE]))
    assert args.metrics_port == _value_at(values, "metrics.port")
    assert args.liveness == f"http://0.0.0.0:{_value_at(values, 'liveness.port')}/healthz"
    assert args.peering is None  # standalone: one replica (see the Deployment)


# --- RBAC and watch mode --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "namespaces"),
    [({}, [NAMESPACE]), (MULTI_NAMESPACE, MULTI_NAMESPACE["watch"]["namespaces"])],
    ids=["release_namespace", "listed_namespaces"],
)
def test_namespaced_mode_role_per_namespace(chart: helm.Chart, values: dict[str, Any], namespaces: list[str]) -> None:
    objects = render(chart, values)
    roles, bindings = of_kind(objects, "Role"), of_kind(objects, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(namespaces)
    assert sorted(b["metadata"]["namespace"] for b in bindings) == sorted(namespaces)
    for role in roles:
        assert_rules_match(role["rules"], cluster_wide=False)
    for binding in bindings:
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": FULLNAME}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    assert not of_kind(objects, "ClusterRole") and not of_kind(objects, "ClusterRoleBinding")
    args = container(objects)["args"]
    assert [a for a in args if a in ("-A", "-n")] == ["-n"] * len(namespaces)
    assert [args[i + 1] for i, a in enumerate(args) if a == "-n"] == namespaces


def test_cluster_wide_mode_cluster_role(chart: helm.Chart) -> None:
    objects = render(chart, NON_DEFAULT)
    role = only(objects, "ClusterRole")
    assert_rules_match(role["rules"], cluster_wide=True)
    binding = only(objects, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": FULLNAME}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "loraresume", "namespace": NAMESPACE}]
    assert not of_kind(objects, "Role") and not of_kind(objects, "RoleBinding")
    args = container(objects)["args"]
    assert "-A" in args and "-n" not in args


@pytest.mark.parametrize("values", [{}, NON_DEFAULT], ids=["role", "cluster_role"])
def test_every_rbac_rule_has_a_comment_saying_why(chart: helm.Chart, values: dict[str, Any]) -> None:
    lines = render_text(chart, values)["templates/rbac.yaml"].splitlines()
    rule_lines = [i for i, line in enumerate(lines) if line.lstrip().startswith("- apiGroups:")]
    assert rule_lines
    for i in rule_lines:
        assert lines[i - 1].lstrip().startswith("#"), f"rule without a comment: {lines[i]!r}"


# --- values schema and template checks ------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"imagee": {"tag": "x"}}, "additional properties 'imagee' not allowed"),
        ({"storage": {"uriPrefx": "s3://bucket/p/"}}, "at '/storage': additional properties 'uriPrefx' not allowed"),
        (
            {"metrics": {"serviceMonitor": {"enable": True}}},
            "at '/metrics/serviceMonitor': additional properties 'enable'",
        ),
        ({"watch": {"clusterWide": "yes"}}, "at '/watch/clusterWide': got string, want boolean"),
        (
            {"trainer": {"terminationGracePeriodSeconds": "120"}},
            "at '/trainer/terminationGracePeriodSeconds': got string",
        ),
        ({"logLevel": "TRACE"}, "at '/logLevel': value must be one of"),
        ({"trainer": {"pullPolicy": "Sometimes"}}, "at '/trainer/pullPolicy': value must be one of"),
        (
            {"storage": {"uriPrefix": "https://bucket/prefix/"}},
            "at '/storage/uriPrefix': 'https://bucket/prefix/' does not match",
        ),
        ({"storage": {"uriPrefix": "s3://Bucket/"}}, "at '/storage/uriPrefix'"),
        ({"trainer": {"terminationGracePeriodSeconds": 4}}, "at '/trainer/terminationGracePeriodSeconds': minimum"),
        ({"trainer": {"terminationGracePeriodSeconds": 3601}}, "at '/trainer/terminationGracePeriodSeconds': maximum"),
        ({"metrics": {"port": 80}}, "at '/metrics/port': minimum"),
        ({"liveness": {"port": 70000}}, "at '/liveness/port': maximum"),
        ({"spot": {"tolerations": [{"key": "k", "operator": "In"}]}}, "at '/spot/tolerations/0/operator'"),
        (
            {"spot": {"tolerations": [{"key": "k", "efect": "NoSchedule"}]}},
            "at '/spot/tolerations/0': additional properties 'efect'",
        ),
        ({"spot": {"nodeSelector": {"pool": True}}}, "at '/spot/nodeSelector/pool': got boolean, want string"),
        ({"watch": {"namespaces": ["Team_A"]}}, "at '/watch/namespaces/0'"),
        ({"storage": {"credentialsSecret": "S3 Creds"}}, "at '/storage/credentialsSecret'"),
        (
            {"serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": 1}}},
            "at '/serviceAccount/annotations/eks.amazonaws.com~1role-arn'",
        ),
    ],
    ids=[
        "misspelt_top_level",
        "misspelt_nested",
        "misspelt_deep",
        "wrong_type_bool",
        "wrong_type_int",
        "bad_log_level",
        "bad_pull_policy",
        "prefix_not_s3",
        "prefix_bad_bucket",
        "grace_too_short",
        "grace_too_long",
        "privileged_port",
        "port_out_of_range",
        "bad_toleration_operator",
        "misspelt_toleration_key",
        "selector_not_string",
        "bad_namespace",
        "bad_secret_name",
        "annotation_not_string",
    ],
)
def test_schema_refuses_bad_values(chart: helm.Chart, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError) as refused:
        render(chart, values)
    assert message in str(refused.value)
    # `helm install` validates the same way: lint (which runs the install-time checks) reports it.
    report = helm.lint(CHART_DIR, values, namespace=NAMESPACE)
    assert any(message in error for error in report["errors"]), report["errors"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"watch": {"clusterWide": True, "namespaces": ["a"]}},
            "watch.namespaces must be empty when watch.clusterWide is true",
        ),
        ({"liveness": {"port": 8080}}, "metrics.port and liveness.port must differ"),
        ({"serviceAccount": {"create": False}}, "serviceAccount.name is required when serviceAccount.create is false"),
    ],
    ids=["namespaces_with_cluster_wide", "same_ports", "existing_account_without_name"],
)
def test_templates_refuse_inconsistent_values(chart: helm.Chart, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(chart, values)


def _schema_objects(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from _schema_objects(child, f"{path}.{name}" if path else name)
    if isinstance(node.get("items"), dict):
        yield from _schema_objects(node["items"], f"{path}[]")


def test_schema_describes_every_property_and_closes_our_objects(chart: helm.Chart) -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert chart.schema == schema
    for path, node in _schema_objects(schema):
        assert node.get("description"), f"{path or '<root>'}: no description"
        if "properties" in node:
            assert node.get("additionalProperties") is False, f"{path or '<root>'}: additionalProperties must be false"


def test_values_yaml_documents_every_key() -> None:
    """A comment line right above each key of values.yaml, except inside free-form k8s objects."""
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    checked = 0
    for i, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z][\w.-]*):", line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        stack = [(ind, k) for ind, k in stack if ind < indent]
        node = schema
        for _, parent in stack:
            node = node.get("properties", {}).get(parent, {})
        stack.append((indent, key))
        if "properties" not in node:
            continue  # inside a free-form object (resources, affinity...)
        assert key in node["properties"], f"values.yaml key {key!r} is not in the schema"
        assert lines[i - 1].strip().startswith("#"), f"values.yaml line {i + 1}: {key!r} has no comment above it"
        checked += 1
    assert checked >= 40


def test_default_values_are_the_documented_defaults(chart: helm.Chart) -> None:
    values = chart.values
    assert values["watch"] == {"clusterWide": False, "namespaces": []}
    assert values["crds"] == {"install": True, "keep": True}
    assert values["trainer"] == {
        "image": "ghcr.io/loraresume/trainer:0.1.0",
        "pullPolicy": "IfNotPresent",
        "terminationGracePeriodSeconds": 120,
    }
    assert values["metrics"]["port"] == 8080 and values["liveness"]["port"] == 8081
    assert values["reconcileIntervalSeconds"] == 10 and values["logLevel"] == "INFO"
    chart.validate_schema(values)


# --- the CRD --------------------------------------------------------------------------------


def test_crd_copy_in_chart_is_identical_to_crds_dir() -> None:
    assert CRD_COPY.read_bytes() == CRD_SOURCE.read_bytes(), (
        f"{CRD_COPY.relative_to(ROOT)} differs from {CRD_SOURCE.relative_to(ROOT)}: run `make crds` (it writes both), "
        f"or `cp {CRD_SOURCE.relative_to(ROOT)} {CRD_COPY.relative_to(ROOT)}`"
    )


@pytest.mark.parametrize("keep", [True, False], ids=["keep", "no_keep"])
def test_rendered_crd_is_the_file_plus_keep_annotation(chart: helm.Chart, keep: bool) -> None:
    crd = only(render(chart, {"crds": {"keep": keep}}), "CustomResourceDefinition")
    expected = yaml.safe_load(CRD_SOURCE.read_text())
    annotations = crd["metadata"].pop("annotations", {})
    assert "annotations" not in expected["metadata"]
    assert annotations == ({"helm.sh/resource-policy": "keep"} if keep else {})
    assert crd == expected


def test_crd_omitted_when_not_installed(chart: helm.Chart) -> None:
    objects = render(chart, {"crds": {"install": False}})
    assert not of_kind(objects, "CustomResourceDefinition")
    notes = render_text(chart, {"crds": {"install": False}})["templates/NOTES.txt"]
    assert "kubectl get crd loraresumes.loraresume.dev" in notes


def test_chart_has_no_crds_dir(chart: helm.Chart) -> None:
    """Helm never upgrades crds/ and cannot switch it off: the CRD must come from templates only."""
    assert chart.crds == []


# --- the Deployment -------------------------------------------------------------------------


def test_deployment_runs_one_hardened_standalone_operator(chart: helm.Chart) -> None:
    objects = render(chart)
    deployment = only(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == FULLNAME
    assert pod["automountServiceAccountToken"] is True
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    c = container(objects)
    assert c["image"] == "ghcr.io/loraresume/operator:0.1.0"  # tag defaults to appVersion
    assert c["command"] == ["loraresume-operator"]
    assert c["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]
    assert {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}} in c["env"]
    assert c["resources"] == {"requests": {"cpu": "1000m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}}


@pytest.mark.parametrize(("values", "port"), [({}, 8081), (NON_DEFAULT, 9091)], ids=["default", "non_default"])
def test_liveness_endpoint_and_probe_agree(chart: helm.Chart, values: dict[str, Any], port: int) -> None:
    c = container(render(chart, values))
    args = c["args"]
    assert args[args.index("--liveness") + 1] == f"http://0.0.0.0:{port}/healthz"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    probe = c["livenessProbe"]
    assert probe["httpGet"] == {"path": "/healthz", "port": "liveness"}
    assert ports["liveness"] == port
    metrics_port = values.get("metrics", {}).get("port", 8080)
    assert args[args.index("--metrics-port") + 1] == str(metrics_port) and ports["metrics"] == metrics_port
    liveness = merged(
        {"initialDelaySeconds": 15, "periodSeconds": 20, "timeoutSeconds": 5, "failureThreshold": 3},
        {k: v for k, v in values.get("liveness", {}).items() if k != "port"},
    )
    assert {k: probe[k] for k in liveness} == liveness


def test_pod_options_pass_through(chart: helm.Chart) -> None:
    objects = render(chart, NON_DEFAULT)
    template = only(objects, "Deployment")["spec"]["template"]
    pod = template["spec"]
    v = NON_DEFAULT
    assert container(objects)["image"] == "registry.example.com/ml/loraresume-operator:0.1.1"
    assert container(objects)["imagePullPolicy"] == "Always"
    assert container(objects)["resources"] == v["resources"]
    assert pod["imagePullSecrets"] == v["imagePullSecrets"]
    assert pod["nodeSelector"] == v["nodeSelector"]
    assert pod["tolerations"] == v["tolerations"]
    assert pod["affinity"] == v["affinity"]
    assert pod["priorityClassName"] == v["priorityClassName"]
    assert pod["serviceAccountName"] == "loraresume"
    assert template["metadata"]["annotations"] == v["podAnnotations"]
    assert template["metadata"]["labels"]["team"] == "ml"


# --- ServiceAccount, Service, ServiceMonitor, labels -----------------------------------------


def test_service_account_annotations_for_workload_identity(chart: helm.Chart) -> None:
    account = only(render(chart, merged(NON_DEFAULT, {"serviceAccount": {"create": True}})), "ServiceAccount")
    assert account["metadata"]["name"] == "loraresume"
    assert account["metadata"]["annotations"] == NON_DEFAULT["serviceAccount"]["annotations"]
    assert account["automountServiceAccountToken"] is True


def test_existing_service_account_is_used_everywhere(chart: helm.Chart) -> None:
    objects = render(chart, {"serviceAccount": {"create": False, "name": "existing"}})
    assert not of_kind(objects, "ServiceAccount")
    assert only(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "existing"
    assert only(objects, "RoleBinding")["subjects"][0]["name"] == "existing"


@pytest.mark.parametrize(("values", "monitors"), [({}, 0), (NON_DEFAULT, 1)], ids=["default", "non_default"])
def test_metrics_service_selects_the_operator_pod(chart: helm.Chart, values: dict[str, Any], monitors: int) -> None:
    objects = render(chart, values)
    service = only(objects, "Service")
    pod_labels = only(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port = values.get("metrics", {}).get("port", 8080)
    assert service["spec"]["ports"] == [{"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"}]
    assert len(of_kind(objects, "ServiceMonitor")) == monitors


def test_service_monitor_scrapes_the_metrics_service(chart: helm.Chart) -> None:
    objects = render(chart, NON_DEFAULT)
    monitor, service = only(objects, "ServiceMonitor"), only(objects, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}
    ]
    assert service["metadata"]["annotations"] == {"prometheus.io/scrape": "true"}


def test_standard_labels_on_every_object_but_the_crd(chart: helm.Chart) -> None:
    for obj in render(chart, MULTI_NAMESPACE):
        labels = obj["metadata"].get("labels", {})
        if obj["kind"] == "CustomResourceDefinition":
            assert not labels  # rendered exactly as generated
            continue
        assert labels["app.kubernetes.io/name"] == "loraresume-operator"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/version"] == "0.1.0"
        assert labels["helm.sh/chart"] == "loraresume-operator-0.1.0"


def test_chart_metadata(chart: helm.Chart) -> None:
    meta = chart.metadata
    assert (meta["apiVersion"], meta["name"], meta["version"], meta["appVersion"]) == (
        "v2",
        "loraresume-operator",
        "0.1.0",
        "0.1.0",
    )
    assert meta["kubeVersion"] == ">=1.29.0-0"


# --- NOTES.txt ------------------------------------------------------------------------------


def test_notes_say_what_to_do_next(chart: helm.Chart) -> None:
    notes = render_text(chart)["templates/NOTES.txt"]
    for needle in (
        "kubectl -n ml create secret generic",
        "AWS_ACCESS_KEY_ID",
        "apply -f",
        "get lr -w",
        "describe lr",
        "port-forward svc/lr-loraresume-operator-metrics 8080",
        "/metrics",
    ):
        assert needle in notes, needle
    notes = render_text(chart, NON_DEFAULT)["templates/NOTES.txt"]
    assert "every namespace" in notes and "create secret generic s3-creds" in notes and "ServiceMonitor" in notes


def test_packaged_chart_keeps_the_crd(tmp_path: Path) -> None:
    """`helm package` honours .helmignore: the archive must still carry files/ (the CRD)."""
    archive = helm.package(CHART_DIR, destination=tmp_path)
    assert Path(archive).name == "loraresume-operator-0.1.0.tgz"
    with helm.Chart.load(archive) as packaged:
        crd = only(render(packaged), "CustomResourceDefinition")
    assert crd["metadata"]["name"] == "loraresumes.loraresume.dev"
