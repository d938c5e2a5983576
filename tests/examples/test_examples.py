"""Everything in examples/ is valid and says what it claims.

- LoraResumes (plain files, the demo's, and what `kubectl kustomize` builds) pass the CRD's
  openAPIV3Schema (the committed crds/ file, as the API server would check it; its freshness
  is tests/operator/test_crd.py's) and the operator's model, and mean the same after the API
  server's defaulting.
- Core objects pass the Kubernetes 1.33 API schema; Argo CD Applications have what Argo CD needs.
- The seed parameters, the curriculum chain and the continuation's adapter are what they say.
- The Argo CD health script runs in a real Lua runtime (5.1, as Argo CD's gopher-lua, and 5.4).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from loraresume_operator.pods import CREDENTIAL_KEYS
from loraresume_operator.spec import API_VERSION, GROUP, KIND, LoraResumeSpec, LoraResumeStatus, Phase
from loraresume_trainer.checkpoint_store import ADAPTER_DIR
from loraresume_trainer.s3uri import S3Uri
from tests.operator.test_crd import apply_defaults, schema_errors

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
CRD_FILE = ROOT / "crds" / "loraresume.dev_loraresumes.yaml"
HEALTH_LUA = EXAMPLES / "argocd" / "health-loraresume.lua"
KUSTOMIZE = EXAMPLES / "kustomize"
OVERLAY = KUSTOMIZE / "overlays" / "production"
KUBERNETES_VERSION = "1.33"
ARGO_API = "argoproj.io/v1alpha1"


# --- collecting the documents ----------------------------------------------------------------


def rel(path: Path) -> str:
    return str(path.relative_to(EXAMPLES))


def kustomization_files() -> list[Path]:
    return sorted(EXAMPLES.rglob("kustomization.yaml"))


def kustomize_patch_files() -> set[Path]:
    """Patch files the kustomizations name: partial objects, checked through the built output."""
    patches = set()
    for path in kustomization_files():
        for patch in yaml.safe_load(path.read_text()).get("patches", []):
            if "path" in patch:
                patches.add((path.parent / patch["path"]).resolve())
    return patches


def object_files() -> list[Path]:
    """The YAML files that are Kubernetes objects to apply (not kustomizations or their patches)."""
    skip = set(kustomization_files()) | kustomize_patch_files()
    return [p for p in sorted(EXAMPLES.rglob("*.yaml")) if p.resolve() not in skip and p not in skip]


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def all_objects() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{rel(p)}:{d['metadata']['name']}", d) for p in object_files() for d in documents(p)]


def lora_resumes() -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name, doc in all_objects() if doc.get("kind") == KIND]


def others() -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name, doc in all_objects() if doc.get("kind") != KIND]


def the(name: str) -> list[dict[str, Any]]:
    return documents(EXAMPLES / name)


@cache
def crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD_FILE.read_text())
    [version] = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def check_lora_resume(doc: dict[str, Any]) -> LoraResumeSpec:
    """What the API server and the operator would both accept; the same spec after defaulting."""
    assert (doc["apiVersion"], doc["kind"]) == (API_VERSION, KIND)
    root = crd_schema()
    assert [f"{list(e.absolute_path)}: {e.message}" for e in schema_errors(root, doc)] == []
    spec = LoraResumeSpec.model_validate(doc["spec"])
    assert LoraResumeSpec.model_validate(apply_defaults(doc["spec"], root["properties"]["spec"])) == spec
    return spec


@cache
def kustomize_build(directory: Path) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


# --- every document -------------------------------------------------------------------------------


def test_the_examples_are_all_there() -> None:
    names = {name for name, _ in all_objects()}
    assert {"resume.yaml:support-bot-v2", "continuation.yaml:support-bot-v3", "curriculum.yaml:support-bot-stage-1",
            "curriculum.yaml:support-bot-stage-2", "sandbox/resume.yaml:demo", "s3-credentials-secret.yaml:s3-creds",
            "argocd/application.yaml:loraresume-operator", "argocd/application.yaml:loraresume-jobs",
            "argocd/argocd-cm-patch.yaml:argocd-cm", "kustomize/base/loraresume.yaml:support-bot"} <= names  # fmt: skip


def test_every_yaml_file_is_an_object_a_kustomization_or_a_patch_it_uses() -> None:
    for path in sorted(EXAMPLES.rglob("*.yaml")):
        docs = documents(path)
        assert docs, f"{rel(path)} is empty"
        for doc in docs:
            assert {"apiVersion", "kind"} <= set(doc), rel(path)
            if path in kustomization_files():
                assert (doc["apiVersion"], doc["kind"]) == ("kustomize.config.k8s.io/v1beta1", "Kustomization")
            else:
                assert doc.get("metadata", {}).get("name"), f"{rel(path)}: a document without metadata.name"


@pytest.mark.parametrize("name,doc", lora_resumes(), ids=[n for n, _ in lora_resumes()])
def test_lora_resume_is_valid_for_the_crd_and_the_model(name: str, doc: dict[str, Any]) -> None:
    check_lora_resume(doc)


@pytest.mark.parametrize("name,doc", others(), ids=[n for n, _ in others()])
def test_other_object_is_valid(name: str, doc: dict[str, Any]) -> None:
    if doc["apiVersion"] == ARGO_API:
        check_argo_application(doc)
    else:  # a built-in kind (an unknown one raises SchemaNotFoundError)
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


# --- the seed's job, the chain, the continuation, the Secret -------------------------------------


def test_resume_example_carries_the_seed_parameters() -> None:
    [doc] = the("resume.yaml")
    spec = check_lora_resume(doc)
    assert doc["metadata"]["name"] == "support-bot-v2"
    assert spec.base_model == "unsloth/llama-3-8b-bnb-4bit"
    assert spec.max_seq_length == 2048
    assert spec.load_in_4bit is True
    assert spec.adapter is not None and spec.adapter.from_resource is None
    assert spec.adapter.uri == "s3://artifacts/adapters/support-bot-v1/"
    assert spec.dataset.template == "alpaca" and spec.dataset.source == "s3://data/support/new.jsonl"
    assert (spec.dataset.format, spec.dataset.split) == ("jsonl", "train")
    t = spec.training
    assert t.per_device_train_batch_size == 2
    assert t.gradient_accumulation_steps == 4
    assert t.warmup_steps == 5
    assert t.max_steps == 100
    assert t.learning_rate == 1e-4
    assert t.optim == "adamw_8bit"
    assert t.logging_steps == 1
    assert t.save_steps == 10
    assert spec.storage.uri == "s3://checkpoints/support-bot-v2/"
    assert spec.storage.credentials_secret == "s3-creds"
    assert (spec.resources.gpus, spec.resources.memory) == (1, "48Gi")
    spot = spec.scheduling.spot
    assert spot.enabled and spot.fallback_to_on_demand_after == 3
    assert spot.node_selector == {"cloud.google.com/gke-spot": "true"}
    tolerations = [t.model_dump(by_alias=True, exclude_none=True) for t in spot.tolerations]
    gke = {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
    assert gke in tolerations
    assert {"key": "spot", "operator": "Exists", "effect": "NoSchedule"} in tolerations  # a generic taint
    assert spec.termination_grace_period_seconds == 120
    # The grace period's comment covers each cloud's notice.
    text = (EXAMPLES / "resume.yaml").read_text()
    comment = text[text.index("# SIGTERM -> SIGKILL") : text.index("terminationGracePeriodSeconds:")]
    assert "GKE spot" in comment and "15 s" in comment and "120 s" in comment
    assert "AWS spot" in comment and "2-minute" in comment


def test_curriculum_stage_two_starts_from_stage_one_in_the_same_namespace() -> None:
    stage1, stage2 = the("curriculum.yaml")
    check_lora_resume(stage1)
    check_lora_resume(stage2)
    assert "adapter" not in stage1["spec"], "stage 1 trains a new LoRA"
    assert stage2["spec"]["adapter"] == {"fromResource": stage1["metadata"]["name"]}
    assert stage1["metadata"].get("namespace") == stage2["metadata"].get("namespace")
    assert stage1["spec"]["storage"]["uri"] != stage2["spec"]["storage"]["uri"]
    assert stage1["spec"]["baseModel"] == stage2["spec"]["baseModel"]


def test_continuation_starts_from_the_adapter_the_resume_example_saves() -> None:
    [previous] = the("resume.yaml")
    [continuation] = the("continuation.yaml")
    spec, before = check_lora_resume(continuation), check_lora_resume(previous)
    # Where the trainer publishes the final adapter (CheckpointStore: <storage.uri>/adapter/).
    saved_at = str(S3Uri.parse(before.storage.uri).as_dir().child(ADAPTER_DIR))
    assert spec.adapter is not None and spec.adapter.uri == saved_at
    assert spec.storage.uri != before.storage.uri, "a new run needs a new storage.uri"
    assert spec.dataset != before.dataset, "new data"
    assert spec.base_model == before.base_model


def test_credentials_secret_has_the_keys_the_trainer_reads_and_only_placeholders() -> None:
    [secret] = the("s3-credentials-secret.yaml")
    required = {key for key, optional in CREDENTIAL_KEYS if not optional}
    assert (secret["kind"], secret["type"]) == ("Secret", "Opaque")
    assert set(secret["stringData"]) == required and "data" not in secret
    for value in secret["stringData"].values():
        assert value.startswith("REPLACE_"), "placeholders only: real keys never go in git"
        assert not re.fullmatch(r"(AKIA|ASIA)[A-Z0-9]{16}", value)
    text = (EXAMPLES / "s3-credentials-secret.yaml").read_text()
    assert "kubectl create secret generic" in text and "External Secrets" in text
    # The LoraResume examples name this Secret.
    named = {doc["spec"]["storage"].get("credentialsSecret") for name, doc in lora_resumes()
             if not name.startswith("sandbox/")}  # fmt: skip
    assert named == {secret["metadata"]["name"]}


# --- Argo CD --------------------------------------------------------------------------------------


def check_argo_application(doc: dict[str, Any]) -> None:
    """The fields Argo CD requires of an Application, and the ones these examples rely on."""
    assert doc["kind"] == "Application"
    assert doc["metadata"]["name"] and doc["metadata"]["namespace"] == "argocd"
    spec = doc["spec"]
    assert spec["project"]
    destination = spec["destination"]
    assert ("server" in destination) != ("name" in destination), "destination: exactly one of server or name"
    assert destination["namespace"]
    sources = [spec["source"]] if "source" in spec else spec["sources"]
    for source in sources:
        assert source["repoURL"] and source.get("targetRevision")
        assert ("path" in source) != ("chart" in source), "a source is a git path or a Helm chart"
        if "path" in source:
            # The path is in this repository (the chart or a kustomization).
            directory = ROOT / source["path"]
            assert (directory / "Chart.yaml").is_file() or (directory / "kustomization.yaml").is_file(), source["path"]
    for option in spec.get("syncPolicy", {}).get("syncOptions", []):
        assert re.fullmatch(r"[A-Za-z]+=(true|false)", option), option


def applications() -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in the("argocd/application.yaml")}


def test_operator_application_installs_the_chart_server_side() -> None:
    app = applications()["loraresume-operator"]
    source = app["spec"]["source"]
    assert source["path"] == "helm/loraresume-operator"
    assert "ServerSideApply=true" in app["spec"]["syncPolicy"]["syncOptions"]
    assert "resources-finalizer.argocd.argoproj.io" not in app["metadata"].get("finalizers", []), \
        "deleting the Application must not delete the CRD (and with it every LoraResume)"  # fmt: skip
    values = source["helm"]["valuesObject"]
    assert values["watch"] == {"clusterWide": False, "namespaces": [app_namespace("loraresume-jobs")]}
    assert values["storage"]["credentialsSecret"] == the("s3-credentials-secret.yaml")[0]["metadata"]["name"]
    assert values["storage"]["uriPrefix"].startswith("s3://") and values["trainer"]["image"]


def app_namespace(name: str) -> str:
    return applications()[name]["spec"]["destination"]["namespace"]


def test_operator_application_values_pass_the_charts_schema() -> None:
    schema_file = ROOT / "helm" / "loraresume-operator" / "values.schema.json"
    if not schema_file.is_file():
        pytest.skip("the chart has no values.schema.json yet")
    import jsonschema

    values = applications()["loraresume-operator"]["spec"]["source"]["helm"]["valuesObject"]
    schema = json.loads(schema_file.read_text())
    errors = jsonschema.validators.validator_for(schema)(schema).iter_errors(values)
    assert [f"{list(e.absolute_path)}: {e.message}" for e in errors] == []


def test_jobs_application_syncs_the_production_overlay_after_the_operator() -> None:
    apps = applications()
    jobs = apps["loraresume-jobs"]
    assert jobs["spec"]["source"]["path"] == str(OVERLAY.relative_to(ROOT))
    assert jobs["spec"]["destination"]["namespace"] == yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())[
        "namespace"]  # fmt: skip
    assert "SkipDryRunOnMissingResource=true" in jobs["spec"]["syncPolicy"]["syncOptions"]
    wave = {name: int(app["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"]) for name, app in apps.items()}
    assert wave["loraresume-operator"] < wave["loraresume-jobs"]


def test_argocd_cm_patch_installs_the_lua_file_under_the_health_key() -> None:
    [cm] = the("argocd/argocd-cm-patch.yaml")
    assert (cm["kind"], cm["metadata"]["name"], cm["metadata"]["namespace"]) == ("ConfigMap", "argocd-cm", "argocd")
    key = f"resource.customizations.health.{GROUP}_{KIND}"
    assert key == "resource.customizations.health.loraresume.dev_LoraResume"
    assert list(cm["data"]) == [key]
    assert cm["data"][key] == HEALTH_LUA.read_text()


def test_health_script_reads_only_status_fields_the_crd_has() -> None:
    read = set(re.findall(r"\bstatus\.([A-Za-z]+)", HEALTH_LUA.read_text()))
    assert {"phase", "message", "observedGeneration", "step", "maxSteps", "attempt", "preemptions"} <= read
    assert read <= set(crd_schema()["properties"]["status"]["properties"])


def status(**fields: Any) -> dict[str, Any]:
    """A status as the operator writes it (the model's names and defaults)."""
    return LoraResumeStatus.model_validate(fields).model_dump(by_alias=True, mode="json", exclude_none=True)


ADAPTER = "s3://checkpoints/support-bot-v2/adapter/"
HEALTH_CASES = [
    # (case, metadata.generation, status or None, expected status, words the message holds)
    ("no status", 1, None, "Progressing", "Waiting for the operator"),
    ("empty status", 1, {}, "Progressing", "Waiting for the operator"),
    ("pending first pod", 1, status(phase="Pending", observed_generation=1),
     "Progressing", "Pending: step 0/0, attempt 0"),
    ("pending on its adapter source", 1,
     status(phase="Pending", message="waiting for LoraResume stage-1 (adapter source) to succeed",
            observed_generation=1),
     "Progressing", "waiting for LoraResume stage-1 (adapter source) to succeed"),
    ("running", 1,
     status(phase="Running", step=60, max_steps=100, progress="60/100", attempt=3, preemptions=2,
            message="attempt 3: pod support-bot-v2-3", observed_generation=1),
     "Progressing", "Running: step 60/100, attempt 3, 2 preemptions, 0 failures - attempt 3: pod support-bot-v2-3"),
    ("running without a progress string", 1,
     {"phase": "Running", "step": 7, "maxSteps": 100, "attempt": 1, "observedGeneration": 1},
     "Progressing", "Running: step 7/100, attempt 1, 0 preemptions, 0 failures"),
    ("resuming after a preemption", 1,
     status(phase="Resuming", step=40, max_steps=100, progress="40/100", attempt=2, preemptions=1, failures=1,
            observed_generation=1),
     "Progressing", "Resuming: step 40/100, attempt 2, 1 preemption, 1 failure"),
    ("suspended", 1, status(phase="Suspended", message="suspended (spec.suspend); the next attempt resumes from "
                            "s3://c/p/checkpoints/checkpoint-123/", observed_generation=1),
     "Suspended", "suspended (spec.suspend); the next attempt resumes from s3://c/p/checkpoints/checkpoint-123/"),
    ("succeeded", 1, status(phase="Succeeded", message=f"adapter saved to {ADAPTER}", output_adapter=ADAPTER,
                            step=100, max_steps=100, observed_generation=1), "Healthy", f"adapter saved to {ADAPTER}"),
    ("succeeded, no message", 1, {"phase": "Succeeded", "outputAdapter": ADAPTER, "observedGeneration": 1},
     "Healthy", f"adapter saved to {ADAPTER}"),
    ("failed", 1, status(phase="Failed", message="attempt 1: dataset: column 'instruction' missing",
                         observed_generation=1), "Degraded", "attempt 1: dataset: column 'instruction' missing"),
    ("stale: spec edited after success", 2, status(phase="Succeeded", observed_generation=1),
     "Progressing", "observe generation 2 (status is for generation 1)"),
    ("stale: failed, then edited", 3, status(phase="Failed", message="x", observed_generation=2),
     "Progressing", "observe generation 3"),
    ("no observedGeneration yet", 1, {"phase": "Running"}, "Progressing", "observe generation 1"),
    ("object without a generation", None, {"phase": "Failed", "message": "boom"}, "Degraded", "boom"),
    ("a phase this script does not know", 1, {"phase": "Paused", "observedGeneration": 1}, "Unknown", "Paused"),
]  # fmt: skip


def to_lua(runtime: Any, value: Any, floats: bool) -> Any:
    """Python JSON -> Lua tables (lists 1-based). floats=True: numbers as Argo CD passes them (float64)."""
    if isinstance(value, dict):
        return runtime.table_from({k: to_lua(runtime, v, floats) for k, v in value.items() if v is not None})
    if isinstance(value, list):
        return runtime.table_from([to_lua(runtime, v, floats) for v in value])
    if isinstance(value, int) and not isinstance(value, bool) and floats:
        return float(value)
    return value


def run_health(obj: dict[str, Any], lua_version: str, floats: bool) -> tuple[str, str]:
    lupa = pytest.importorskip(f"lupa.{lua_version}")
    runtime = lupa.LuaRuntime(unpack_returned_tuples=True)
    runtime.globals().obj = to_lua(runtime, obj, floats)
    hs = runtime.execute(HEALTH_LUA.read_text())
    assert set(dict(hs.items())) == {"status", "message"}
    return hs["status"], hs["message"]


@pytest.mark.parametrize("lua_version", ["lua51", "lua54"])
@pytest.mark.parametrize("floats", [True, False], ids=["json-floats", "integers"])
@pytest.mark.parametrize("case,generation,state,expected,words", HEALTH_CASES, ids=[c[0] for c in HEALTH_CASES])
def test_argocd_health(case: str, generation: int | None, state: dict | None, expected: str, words: str,
                       lua_version: str, floats: bool) -> None:  # fmt: skip
    obj: dict[str, Any] = {"apiVersion": API_VERSION, "kind": KIND,
                           "metadata": {"name": "support-bot-v2", "namespace": "ml-prod"}, "spec": {}}  # fmt: skip
    if generation is not None:
        obj["metadata"]["generation"] = generation
    if state is not None:
        obj["status"] = state
    health, message = run_health(obj, lua_version, floats)
    assert (health, words in message) == (expected, True), message
    assert not re.search(r"\d\.0\b", message), f"a float leaked into the message: {message}"


def test_health_cases_cover_every_phase() -> None:
    phases = {state.get("phase") for _, _, state, _, _ in HEALTH_CASES if state}
    assert {p.value for p in Phase} <= phases


# --- Kustomize ------------------------------------------------------------------------------------


def built(directory: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(kustomize_build(directory)) if d]


@pytest.mark.parametrize("directory", [KUSTOMIZE / "base", OVERLAY], ids=["base", "production"])
def test_kustomize_build_is_valid(directory: Path) -> None:
    docs = built(directory)
    assert [d["kind"] for d in docs] == [KIND]
    check_lora_resume(docs[0])


def test_production_overlay_has_the_patched_values() -> None:
    [base] = built(KUSTOMIZE / "base")
    [prod] = built(OVERLAY)
    assert prod["metadata"]["namespace"] == "ml-prod" and "namespace" not in base["metadata"]
    assert prod["metadata"]["name"] == base["metadata"]["name"] == "support-bot"
    assert prod["metadata"]["labels"] == {"app.kubernetes.io/part-of": "support-bot", "environment": "production"}
    spec, base_spec = check_lora_resume(prod), check_lora_resume(base)
    # The merge patch: maxSteps and storage changed, the rest of training and storage kept.
    assert (base_spec.training.max_steps, spec.training.max_steps) == (20, 100)
    assert spec.training.model_copy(update={"max_steps": 20}) == base_spec.training
    assert spec.storage.uri == "s3://checkpoints/prod/support-bot/" != base_spec.storage.uri
    assert spec.storage.keep_checkpoints == 5
    assert spec.storage.credentials_secret == base_spec.storage.credentials_secret
    # The JSON 6902 patch: spot placement with the fallback, and the grace period.
    assert not base_spec.scheduling.spot.enabled
    spot = spec.scheduling.spot
    assert spot.enabled and spot.fallback_to_on_demand_after == 3
    assert spot.node_selector == {"cloud.google.com/gke-spot": "true"} and len(spot.tolerations) == 1
    assert spec.termination_grace_period_seconds == 120
    # Everything else is the base's.
    unchanged = {"training", "storage", "scheduling", "termination_grace_period_seconds"}
    assert spec.model_dump(exclude=unchanged) == base_spec.model_dump(exclude=unchanged)


# --- the README -----------------------------------------------------------------------------------


def test_readme_lists_every_example() -> None:
    readme = (EXAMPLES / "README.md").read_text()
    for path in sorted(EXAMPLES.rglob("*")):
        if path.is_file() and path.suffix in (".yaml", ".lua") and "kustomize" not in path.parts:
            assert f"({rel(path)})" in readme, f"examples/README.md does not list {rel(path)}"
    assert "kubectl apply -k examples/kustomize/overlays/production" in readme
