"""Cluster-wide defaults from the operator's environment (the Helm chart sets them from values).

A LoraResume may leave storage, credentials, grace period and spot placement to the platform
team's defaults; `effective_spec` fills them in before anything is decided, so the pure
decision and pod building only ever see a complete spec. Bad settings stop the operator at
start with the variable named (and the Helm value it comes from), never a half-working run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import StringConstraints, TypeAdapter, ValidationError

from loraresume_trainer.errors import ConfigError
from loraresume_trainer.s3uri import S3Uri

from .policy import Policy
from .spec import LoraResumeSpec, Toleration

DEFAULT_TRAINER_IMAGE = "ghcr.io/loraresume/trainer:0.1.0"
DEFAULT_GRACE_PERIOD_SECONDS = 120

# Environment variable -> the Helm value that sets it (named in errors).
ENV = {
    "LORARESUME_TRAINER_IMAGE": "trainer.image",
    "LORARESUME_IMAGE_PULL_POLICY": "trainer.pullPolicy",
    "LORARESUME_GRACE_PERIOD_SECONDS": "trainer.terminationGracePeriodSeconds",
    "LORARESUME_STORAGE_URI_PREFIX": "storage.uriPrefix",
    "LORARESUME_S3_ENDPOINT": "storage.endpoint",
    "LORARESUME_S3_REGION": "storage.region",
    "LORARESUME_CREDENTIALS_SECRET": "storage.credentialsSecret",
    "LORARESUME_SPOT_NODE_SELECTOR": "spot.nodeSelector",
    "LORARESUME_SPOT_TOLERATIONS": "spot.tolerations",
    "LORARESUME_ON_DEMAND_NODE_SELECTOR": "spot.onDemandNodeSelector",
    "LORARESUME_ALLOWED_IMAGES": "policy.allowedImages",
    "LORARESUME_ALLOWED_SERVICE_ACCOUNTS": "policy.allowedServiceAccounts",
    "LORARESUME_REQUIRE_CREDENTIALS_LABEL": "policy.requireCredentialsLabel",
}

_SELECTOR = TypeAdapter(dict[str, str])
_TOLERATIONS = TypeAdapter(list[Toleration])
_NAMES = TypeAdapter(list[Annotated[str, StringConstraints(min_length=1)]])


class OperatorSettingsError(ConfigError):
    """An operator setting (environment variable) is malformed; the operator refuses to start."""


@dataclass(frozen=True)
class OperatorDefaults:
    """What a LoraResume gets for the fields it leaves empty."""

    trainer_image: str = DEFAULT_TRAINER_IMAGE
    image_pull_policy: str = "IfNotPresent"
    grace_period_seconds: int = DEFAULT_GRACE_PERIOD_SECONDS
    storage_uri_prefix: str | None = None
    storage_endpoint: str | None = None
    storage_region: str | None = None
    credentials_secret: str | None = None
    spot_node_selector: Mapping[str, str] = field(default_factory=dict)
    spot_tolerations: tuple[Toleration, ...] = ()
    on_demand_node_selector: Mapping[str, str] = field(default_factory=dict)
    policy: Policy = field(default_factory=Policy)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorDefaults:
        """Raises OperatorSettingsError naming the variable and its Helm value."""
        env = os.environ if env is None else env
        get = lambda name: (env.get(name) or "").strip()  # noqa: E731
        kwargs: dict[str, Any] = {}
        if get("LORARESUME_TRAINER_IMAGE"):
            kwargs["trainer_image"] = get("LORARESUME_TRAINER_IMAGE")
        if get("LORARESUME_IMAGE_PULL_POLICY"):
            kwargs["image_pull_policy"] = _choice(
                get, "LORARESUME_IMAGE_PULL_POLICY", ("Always", "IfNotPresent", "Never")
            )
        if get("LORARESUME_GRACE_PERIOD_SECONDS"):
            kwargs["grace_period_seconds"] = _grace(get("LORARESUME_GRACE_PERIOD_SECONDS"))
        if get("LORARESUME_STORAGE_URI_PREFIX"):
            kwargs["storage_uri_prefix"] = _prefix(get("LORARESUME_STORAGE_URI_PREFIX"))
        kwargs["storage_endpoint"] = get("LORARESUME_S3_ENDPOINT") or None
        kwargs["storage_region"] = get("LORARESUME_S3_REGION") or None
        kwargs["credentials_secret"] = get("LORARESUME_CREDENTIALS_SECRET") or None
        for name, key in (
            ("LORARESUME_SPOT_NODE_SELECTOR", "spot_node_selector"),
            ("LORARESUME_ON_DEMAND_NODE_SELECTOR", "on_demand_node_selector"),
        ):
            if get(name):
                kwargs[key] = _json(name, get(name), _SELECTOR, "a JSON object of node labels")
        if get("LORARESUME_SPOT_TOLERATIONS"):
            kwargs["spot_tolerations"] = tuple(
                _json(
                    "LORARESUME_SPOT_TOLERATIONS",
                    get("LORARESUME_SPOT_TOLERATIONS"),
                    _TOLERATIONS,
                    "a JSON list of core/v1 tolerations",
                )
            )
        require = get("LORARESUME_REQUIRE_CREDENTIALS_LABEL")
        kwargs["policy"] = Policy(
            allowed_images=tuple(_names(get, "LORARESUME_ALLOWED_IMAGES")),
            allowed_service_accounts=tuple(_names(get, "LORARESUME_ALLOWED_SERVICE_ACCOUNTS")),
            require_credentials_label=not require
            or _choice(get, "LORARESUME_REQUIRE_CREDENTIALS_LABEL", ("true", "false")) == "true",
        )
        return cls(**kwargs)

    def storage_uri_for(self, namespace: str, name: str) -> str | None:
        """<prefix>/<namespace>/<name>/ : unique per resource, stable across operator restarts."""
        if not self.storage_uri_prefix:
            return None
        return str(S3Uri.parse(self.storage_uri_prefix).as_dir().child(f"{namespace}/{name}/"))


def _problem(name: str, message: str) -> OperatorSettingsError:
    return OperatorSettingsError(f"operator setting {name} (Helm value {ENV[name]}): {message}")


def _choice(get: Any, name: str, allowed: tuple[str, ...]) -> str:
    value = get(name)
    if value not in allowed:
        raise _problem(name, f"expected one of {', '.join(allowed)}, got {value!r}")
    return value


def _names(get: Any, name: str) -> list[str]:
    value = get(name)
    return list(_json(name, value, _NAMES, "a JSON list of non-empty strings")) if value else []


def _grace(value: str) -> int:
    name = "LORARESUME_GRACE_PERIOD_SECONDS"
    try:
        seconds = int(value)
    except ValueError:
        raise _problem(name, f"expected whole seconds, got {value!r}") from None
    if not 5 <= seconds <= 3600:
        raise _problem(name, f"expected 5 to 3600 seconds, got {seconds}")
    return seconds


def _prefix(value: str) -> str:
    name = "LORARESUME_STORAGE_URI_PREFIX"
    try:
        return str(S3Uri.parse(value).as_dir())
    except ValueError as exc:
        raise _problem(name, str(exc)) from None


def _json(name: str, value: str, adapter: TypeAdapter[Any], expected: str) -> Any:
    try:
        return adapter.validate_json(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise _problem(name, f"expected {expected}: {where + ': ' if where else ''}{first['msg']}") from None


def effective_spec(spec: LoraResumeSpec, defaults: OperatorDefaults, storage_uri: str | None) -> LoraResumeSpec:
    """The spec with the operator's defaults filled in where it leaves fields empty.

    `storage_uri` is the run's resolved prefix (from status once recorded, so a later change of
    the operator's default prefix never moves a running job); None when it cannot be resolved.
    """
    storage = spec.storage.model_copy(
        update={
            "uri": spec.storage.uri or storage_uri,
            "endpoint": spec.storage.endpoint or defaults.storage_endpoint,
            "region": spec.storage.region or defaults.storage_region,
            "credentials_secret": spec.storage.credentials_secret or defaults.credentials_secret,
        }
    )
    spot = spec.scheduling.spot
    if spot.enabled:
        update: dict[str, Any] = {}
        if not spot.node_selector and not spot.tolerations:
            update = {
                "node_selector": dict(defaults.spot_node_selector),
                "tolerations": list(defaults.spot_tolerations),
            }
        if not spot.on_demand_node_selector:
            update["on_demand_node_selector"] = dict(defaults.on_demand_node_selector)
        spot = spot.model_copy(update=update)
    return spec.model_copy(
        update={
            "storage": storage,
            "scheduling": spec.scheduling.model_copy(update={"spot": spot}),
            "termination_grace_period_seconds": spec.termination_grace_period_seconds or defaults.grace_period_seconds,
        }
    )
