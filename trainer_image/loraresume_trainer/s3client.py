"""The S3 client and the one place where botocore failures become trainer errors.

The classification decides the job's fate: refused credentials or a missing bucket
are permanent (``StorageAuthError``: a relaunch will not fix them), unreachable
endpoints and server errors are transient (``StorageError``). Messages are built
from the error code, the operation and the ``s3://`` URI only, never from the
request, so secrets, session tokens and endpoint userinfo cannot leak into logs or
the pod's termination message.

Retries are bounded and logged: botocore's standard mode retries throttling, 5xx and
connection failures up to the client's total attempts, and every failed attempt is
logged at WARNING (operation, attempt number, error code or exception class; never the
URL or credentials). GetObject bodies up to `BUFFERED_BODY_LIMIT` are read inside that
retry loop, so a body cut short (connection reset, truncated transfer) is retried like a
503 instead of surfacing later from the caller's read; larger bodies stream as before.
"""

from __future__ import annotations

import io
import logging
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .errors import StorageAuthError, StorageError, TrainerError
from .s3uri import redact_url

log = logging.getLogger(__name__)

AUTH_ERROR_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "NoSuchBucket",
        "InvalidToken",
        "ExpiredToken",
        "AllAccessDisabled",
        "InvalidClientTokenId",
        "TokenRefreshRequired",
        "403",
        "Forbidden",
    }
)
TRANSIENT_ERROR_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "503",
        "500",
    }
)
# Requests the endpoint will never accept as configured (wrong region, bad bucket name).
MISCONFIG_ERROR_CODES = frozenset({"AuthorizationHeaderMalformed", "PermanentRedirect", "InvalidBucketName", "301"})
_SAFE_CODE_RE = re.compile(r"^[A-Za-z0-9.]{1,64}$")
_CODE_IN_TEXT_RE = re.compile(r"An error occurred \(([A-Za-z0-9]+)\)")
# GetObject bodies up to this size are read (into memory) before botocore's retry decision.
BUFFERED_BODY_LIMIT = 64 * 1024 * 1024
_MAX_BACKOFF_SECONDS = 20.0  # botocore's standard-mode cap
_BACKOFF_BASE_SECONDS = 0.05  # botocore's standard-mode scale for errors other than throttling


def make_s3_client(
    endpoint_url: str | None = None,
    region: str | None = None,
    *,
    max_attempts: int = 5,
) -> Any:
    """A boto3 S3 client with bounded, logged retries and timeouts.

    ``max_attempts`` is botocore's: retries after the first request, so each call makes
    at most ``max_attempts + 1`` requests (`total_attempts`). Credentials come from
    boto3's standard chain (env vars, shared files, instance roles); this module never
    reads them. With a custom endpoint (MinIO, Ceph, moto) path-style addressing is used
    and checksums are only sent when required, which S3-compatible servers that predate
    the flexible-checksum headers accept.
    """
    import boto3
    from botocore.config import Config

    options: dict[str, Any] = {
        "retries": {"mode": "standard", "max_attempts": max_attempts},
        "connect_timeout": 5,
        "read_timeout": 60,
    }
    if endpoint_url:
        options["s3"] = {"addressing_style": "path"}
        options["request_checksum_calculation"] = "when_required"
        options["response_checksum_validation"] = "when_required"
    # A private session per client: boto3's default session is not thread-safe to create.
    session = boto3.session.Session()
    client = session.client(
        "s3",
        endpoint_url=endpoint_url or None,
        region_name=region or None,
        config=Config(**options),
    )
    install_retry_hooks(client)
    log.debug("S3 client for endpoint %s", redact_url(endpoint_url) or "(AWS default)")
    return client


def install_retry_hooks(client: Any) -> Any:
    """Log every failed attempt of `client` and retry short GetObject bodies within its attempt budget.

    For any boto3 S3 client (the operator's too); idempotent. Returns the client.
    """
    total = total_attempts(client)
    client.meta.events.register("needs-retry.s3", _RetryLog(total), unique_id="loraresume-retry-log")
    # More specific than botocore's own `needs-retry.s3` handler, so it runs first.
    client.meta.events.register(
        "needs-retry.s3.GetObject", _GetObjectBodyGuard(total), unique_id="loraresume-get-object-body"
    )
    return client


def total_attempts(client: Any) -> int:
    """Requests one call of `client` makes at most (the first one plus the retries)."""
    return int(client.meta.config.retries.get("total_max_attempts") or 1)


def _backoff(attempts: int) -> float:
    """botocore's standard-mode delay for a non-throttling failure: full jitter over 0.05 * 2**(attempt-1)
    seconds, capped at 20."""
    return random.random() * min(_MAX_BACKOFF_SECONDS, _BACKOFF_BASE_SECONDS * 2.0 ** (attempts - 1))


def _attempt_failure(response: Any, caught_exception: BaseException | None) -> str | None:
    """A short description of a failed attempt that botocore may retry; None for success or a plain 4xx."""
    if caught_exception is not None:
        return type(caught_exception).__name__  # its message may quote the URL
    if response is None:
        return None
    http_response, parsed = response
    status = getattr(http_response, "status_code", None)
    code = str(((parsed or {}).get("Error") or {}).get("Code", "") or "")
    if code and not _SAFE_CODE_RE.match(code):
        code = "unrecognized error code"
    if code in TRANSIENT_ERROR_CODES or (isinstance(status, int) and (status >= 500 or status == 429)):
        return f"{code or 'no error code'}, HTTP {status}"
    return None


class _RetryLog:
    """`needs-retry` handler: logs every failed attempt; leaves the decision to botocore."""

    def __init__(self, total: int) -> None:
        self.total = total

    def __call__(
        self,
        response: Any = None,
        caught_exception: BaseException | None = None,
        attempts: int = 1,
        operation: Any = None,
        **_: Any,
    ) -> None:
        failure = _attempt_failure(response, caught_exception)
        if failure is not None:
            name = getattr(operation, "name", "request")
            if attempts < self.total:
                log.warning("S3 %s attempt %d of %d failed (%s); retrying", name, attempts, self.total, failure)
            else:
                log.warning("S3 %s attempt %d of %d failed (%s); giving up", name, attempts, self.total, failure)
        return None


class _GetObjectBodyGuard:
    """`needs-retry.s3.GetObject` handler: read a small body now, and retry when it comes up short.

    botocore hands a GetObject body to the caller unread, after its retry loop, so a reset
    or a truncated transfer would fail the caller's read with no retry. Reading bodies up
    to `BUFFERED_BODY_LIMIT` here puts them inside the loop: a short body counts as a
    failed attempt (same bound, same backoff); after the last attempt its error is raised.
    """

    def __init__(self, total: int, limit: int = BUFFERED_BODY_LIMIT) -> None:
        self.total, self.limit = total, limit

    def __call__(self, response: Any = None, attempts: int = 1, **_: Any) -> float | None:
        if response is None:
            return None
        http_response, parsed = response
        body, length = (parsed or {}).get("Body"), (parsed or {}).get("ContentLength")
        if getattr(http_response, "status_code", None) not in (200, 206) or body is None:
            return None
        if not isinstance(length, int) or length > self.limit:
            return None  # unknown or large: streamed to the caller as is
        from botocore.exceptions import (
            ConnectionClosedError,
            FlexibleChecksumError,
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
        )
        from botocore.response import StreamingBody
        from urllib3.exceptions import ProtocolError  # a reset mid-body, as this botocore passes it on

        try:
            data = body.read()
        except (
            ResponseStreamingError,
            IncompleteReadError,
            ReadTimeoutError,
            ConnectionClosedError,
            FlexibleChecksumError,
            ProtocolError,
        ) as exc:
            failure = f"{type(exc).__name__} while reading the body"
            if attempts >= self.total:
                log.warning("S3 GetObject attempt %d of %d failed (%s); giving up", attempts, self.total, failure)
                raise
            log.warning("S3 GetObject attempt %d of %d failed (%s); retrying", attempts, self.total, failure)
            return _backoff(attempts)
        finally:
            body.close()
        parsed["Body"] = StreamingBody(io.BytesIO(data), len(data))
        return None


def _client_error_parts(exc: BaseException) -> tuple[str, int | None]:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", "") or "")
    if code and not _SAFE_CODE_RE.match(code):
        code = "unrecognized error code"  # only echo short, plain codes from the server
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code, status if isinstance(status, int) else None


def _find_cause(exc: BaseException) -> BaseException:
    """Unwrap boto3's transfer wrappers (S3UploadFailedError, RetriesExceededError)."""
    from botocore.exceptions import BotoCoreError, ClientError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ClientError, BotoCoreError)):
            return current
        last = getattr(current, "last_exception", None)
        if isinstance(last, BaseException):
            current = last
            continue
        current = current.__cause__ or current.__context__
    return exc


def classify_s3_error(exc: BaseException, *, operation: str, uri: str) -> TrainerError:
    """Turn a boto3/botocore exception into ``StorageAuthError`` or ``StorageError``."""
    if isinstance(exc, TrainerError):
        return exc
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    cause = _find_cause(exc)
    where = f"while {operation} {uri}"

    if isinstance(cause, (NoCredentialsError, PartialCredentialsError)):
        kind = type(cause).__name__
        return StorageAuthError(
            f"no usable S3 credentials ({kind}) {where}: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (check the credentials secret)"
        )

    if isinstance(cause, ClientError):
        code, status = _client_error_parts(cause)
    else:
        code, status = "", None
        # boto3's S3UploadFailedError keeps only text; recover the error code from it.
        match = _CODE_IN_TEXT_RE.search(str(exc))
        if match and not isinstance(cause, BotoCoreError):
            code = match.group(1)

    if code:
        if code in AUTH_ERROR_CODES or status == 403:
            if code == "NoSuchBucket":
                return StorageAuthError(
                    f"S3 bucket does not exist (NoSuchBucket) {where}: check storage.uri and the endpoint"
                )
            shown = f"HTTP {code} Forbidden" if code == "403" else code
            return StorageAuthError(f"S3 refused the credentials ({shown}) {where}: check the credentials secret")
        if code in MISCONFIG_ERROR_CODES:
            return StorageAuthError(
                f"S3 rejected the request ({code}) {where}: check the bucket's region and the endpoint"
            )
        if code in TRANSIENT_ERROR_CODES or (status is not None and status >= 500):
            return StorageError(f"S3 is unavailable ({code}, HTTP {status}) {where}; retry later")
        shown = f"{code}, HTTP {status}" if status else code
        return StorageError(f"S3 request failed ({shown}) {where}")

    if isinstance(cause, (EndpointConnectionError, ConnectTimeoutError)):
        endpoint = redact_url(getattr(cause, "kwargs", {}).get("endpoint_url", ""))
        host = endpoint.split("/")[2] if endpoint.count("/") >= 2 else "the S3 endpoint"
        return StorageError(f"could not connect to {host} ({type(cause).__name__}) {where}; retry later")
    if isinstance(cause, (ReadTimeoutError, ConnectionClosedError)):
        return StorageError(f"S3 connection failed ({type(cause).__name__}) {where}; retry later")
    if isinstance(cause, BotoCoreError):
        return StorageError(f"S3 client error ({type(cause).__name__}) {where}; retry later")
    return StorageError(f"S3 operation failed ({type(exc).__name__}) {where}")


def is_not_found(exc: BaseException) -> bool:
    """True for a ClientError meaning "no such key" (GET: NoSuchKey, HEAD: 404)."""
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    code, status = _client_error_parts(exc)
    return code in ("NoSuchKey", "404", "NotFound") or (status == 404 and code != "NoSuchBucket")


@contextmanager
def s3_errors(operation: str, uri: object) -> Iterator[None]:
    """Convert botocore/boto3 exceptions raised inside the block via ``classify_s3_error``.

    The original exception is not chained: its text may quote the endpoint URL.
    """
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (ClientError, BotoCoreError, Boto3Error) as exc:
        error = classify_s3_error(exc, operation=operation, uri=str(uri))
        log.debug("%s %s failed: %s", operation, uri, type(exc).__name__)
        raise error from None
