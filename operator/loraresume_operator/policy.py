"""Who may run what: the operator's policy on the images, ServiceAccounts and credential Secrets
a LoraResume may name (pure).

The operator creates pods with rights its users may not have: without a policy, anyone who may
create a LoraResume could run any image, as any ServiceAccount of the namespace, with any Secret
of the namespace in its environment (a confused deputy). The platform team sets the policy with
Helm values; a resource outside it is refused with the field and the value that allows it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec import GROUP, LoraResumeSpec

# A Secret must carry this label to be named in spec.storage.credentialsSecret.
CREDENTIALS_LABEL_KEY = f"{GROUP}/credentials"
CREDENTIALS_LABEL_VALUE = "true"
CREDENTIALS_LABEL = {CREDENTIALS_LABEL_KEY: CREDENTIALS_LABEL_VALUE}
DEFAULT_SERVICE_ACCOUNT = "default"
ANY = "*"


@dataclass(frozen=True)
class Policy:
    """`allowed_images`: image repositories (any tag or digest of `ghcr.io/org/trainer`) or
    prefixes ending in `/` (`registry.example.com/ml/`), besides the operator's trainer image;
    `*` allows any (where an admission controller enforces image policy instead). The same `*`
    allows any ServiceAccount."""

    allowed_images: tuple[str, ...] = ()
    allowed_service_accounts: tuple[str, ...] = ()  # besides the namespace's `default`
    require_credentials_label: bool = True


def image_allowed(image: str, entry: str) -> bool:
    """`entry` names the image exactly, its repository (then any tag or digest), or a prefix ending in '/'."""
    if image == entry or entry == ANY:
        return True
    if entry.endswith("/"):
        return image.startswith(entry)
    return image.startswith((entry + ":", entry + "@"))


def spec_problems(spec: LoraResumeSpec, policy: Policy, trainer_image: str) -> list[str]:
    """Every field of `spec` the policy does not allow, each naming the Helm value that would."""
    problems = []
    image = spec.image
    if image and image != trainer_image and not any(image_allowed(image, e) for e in policy.allowed_images):
        allowed = ", ".join(policy.allowed_images) or "none"
        problems.append(
            f"spec.image: {image!r} is not allowed by the operator's policy: only the trainer image {trainer_image!r} "
            f"and the Helm value policy.allowedImages ({allowed})"
        )
    account = spec.service_account_name
    accounts = policy.allowed_service_accounts
    if account and account != DEFAULT_SERVICE_ACCOUNT and account not in accounts and ANY not in accounts:
        allowed = ", ".join(policy.allowed_service_accounts) or "none"
        problems.append(
            f"spec.serviceAccountName: {account!r} is not allowed by the operator's policy: only "
            f"{DEFAULT_SERVICE_ACCOUNT!r} and the Helm value policy.allowedServiceAccounts ({allowed})"
        )
    return problems


def credentials_problem(
    namespace: str, name: str, labels: dict[str, str] | None, policy: Policy, operator_default: str | None
) -> str | None:
    """Why the Secret `name` may not be used as S3 credentials, or None. The operator's own default
    (Helm value storage.credentialsSecret) is the platform team's choice, and exempt."""
    if not policy.require_credentials_label or name == operator_default:
        return None
    if (labels or {}).get(CREDENTIALS_LABEL_KEY) == CREDENTIALS_LABEL_VALUE:
        return None
    return (
        f"spec.storage.credentialsSecret: Secret {namespace}/{name} is not labelled "
        f'{CREDENTIALS_LABEL_KEY}="{CREDENTIALS_LABEL_VALUE}": the operator\'s policy lets only Secrets so '
        "labelled be used as credentials (Helm value policy.requireCredentialsLabel); label it to allow it"
    )
