"""S3 fixtures: real moto S3 servers on loopback, reachable over HTTP by subprocesses too.

Each server runs in its own Python process (``moto.server.ThreadedMotoServer`` on port
0, which prints the port it got), so its state and moto's process-wide auth settings
stay apart from the tests and from each other.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Shared fixtures of tests/support (module-scoped stacks on the real control plane, the API-server
# judge): registered once here, used by name in any test module.
pytest_plugins = ["tests.support.operator_stack", "tests.support.api_judge", "tests.support.fault_proxy"]

_SERVER_SCRIPT = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # runs until the test session closes our stdin
server.stop()
"""

_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-access-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
_CLEARED_ENV = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    log_path: Path


@dataclass(frozen=True)
class S3AuthServer:
    endpoint: str
    bucket: str
    access_key_id: str
    secret_access_key: str
    log_path: Path


class _ServerProcess:
    def __init__(self, log_path: Path, extra_env: dict[str, str] | None = None):
        env = dict(os.environ)
        env.update(extra_env or {})
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER_SCRIPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().strip()
        if not line.isdigit():
            self.stop()
            raise RuntimeError(f"moto server did not start; see {log_path}")
        self.endpoint = f"http://127.0.0.1:{int(line)}"

    def stop(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def aws_test_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Dummy AWS credentials and no shared config files, for this process and its children."""
    cfg = tmp_path_factory.mktemp("aws-config")
    wanted = dict(_TEST_ENV)
    wanted["AWS_CONFIG_FILE"] = str(cfg / "missing-config")
    wanted["AWS_SHARED_CREDENTIALS_FILE"] = str(cfg / "missing-credentials")
    saved = {name: os.environ.get(name) for name in (*wanted, *_CLEARED_ENV)}
    for name in _CLEARED_ENV:
        os.environ.pop(name, None)
    os.environ.update(wanted)
    try:
        yield wanted
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def s3_server(aws_test_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A moto S3 server (no auth) on 127.0.0.1 for the whole session."""
    logs = tmp_path_factory.mktemp("moto")
    server = _ServerProcess(logs / "moto-s3.log")
    try:
        yield S3Server(server.endpoint, server.log_path)
    finally:
        server.stop()


def _client(endpoint: str, **credentials: str):
    import boto3

    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1", **credentials)


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> tuple[str, str]:
    """A fresh, uniquely named bucket on the session server: ``(endpoint, bucket)``."""
    bucket = f"test-{uuid.uuid4().hex[:20]}"
    _client(s3_server.endpoint).create_bucket(Bucket=bucket)
    return s3_server.endpoint, bucket


@pytest.fixture(scope="session")
def s3_auth_server(aws_test_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3AuthServer]:
    """A second moto server that checks signatures and IAM policies.

    Setup (IAM user, policy, access key, bucket) runs while auth is still off; then
    moto's ``/moto-api/reset-auth`` endpoint sets INITIAL_NO_AUTH_ACTION_COUNT to 0
    inside the server, so every later request must be signed with the created key.
    """
    import boto3

    logs = tmp_path_factory.mktemp("moto-auth")
    server = _ServerProcess(logs / "moto-auth.log")
    try:
        iam = boto3.session.Session().client("iam", endpoint_url=server.endpoint, region_name="us-east-1")
        iam.create_user(UserName="trainer")
        iam.put_user_policy(
            UserName="trainer",
            PolicyName="s3-all",
            PolicyDocument=(
                '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}'
            ),
        )
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        bucket = "auth-bucket"
        _client(server.endpoint).create_bucket(Bucket=bucket)
        request = urllib.request.Request(
            f"{server.endpoint}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "text/plain"},  # a form type would hide the body from moto
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
        yield S3AuthServer(
            endpoint=server.endpoint,
            bucket=bucket,
            access_key_id=key["AccessKeyId"],
            secret_access_key=key["SecretAccessKey"],
            log_path=server.log_path,
        )
    finally:
        server.stop()
