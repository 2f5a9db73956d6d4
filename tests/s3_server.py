"""A real S3 protocol server on 127.0.0.1 for the remote cache's tests (tests/test_remote_cache.py).

moto's `ThreadedMotoServer` (the `moto[server]` extra; s3fs's own tests use it the same way) serves
the S3 REST protocol from a thread of the test process on a free port; s3fs talks to it over HTTP
exactly as to AWS. The `s3_server` session fixture starts one, creates a bucket, and points every
AWS client of the session at it through the standard environment only, as a user would configure
a MinIO or Ceph endpoint:

    AWS_ENDPOINT_URL_S3            the server (botocore reads it; s3fs's `endpoint_url` option or
                                   FSSPEC_S3_ENDPOINT_URL would work too, the latter only if set
                                   before fsspec is imported)
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY   dummy values (`DUMMY_KEY_ID`, `DUMMY_SECRET`), distinctive
                                   so that tests can assert they never appear in a message or a file
    AWS_DEFAULT_REGION             us-east-1
    AWS_EC2_METADATA_DISABLED, AWS_SHARED_CREDENTIALS_FILE, AWS_CONFIG_FILE
                                   so that nothing of the developer's own AWS setup is ever used

and stops it afterwards. `S3Server.another()` starts a second one (for a test that stops a server
mid-run); moto keeps its buckets in the process, so every server of a session sees the same ones.
A test module uses it with `pytest_plugins = ["s3_server"]`.
The fixture skips, naming the package, only when moto, boto3 or s3fs is not installed.
`python tests/s3_server.py` starts one and prints the environment to use it, until Ctrl-C.
"""

from __future__ import annotations

import logging
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

DUMMY_KEY_ID = "TPDUMMYKEYID7Q3XW9ZL"
DUMMY_SECRET = "tp-dummy-secret-4f1c9e2b7a6d5830"
REGION = "us-east-1"


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    _server: Any
    key_id: str = DUMMY_KEY_ID
    secret: str = DUMMY_SECRET

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=DUMMY_KEY_ID,
            aws_secret_access_key=DUMMY_SECRET,
        )

    def objects(self, prefix: str) -> dict[str, bytes]:
        """Every object under `prefix` with its bytes, read back through boto3 (not through s3fs)."""
        client, out = self.client(), {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                out[item["Key"]] = client.get_object(Bucket=self.bucket, Key=item["Key"])["Body"].read()
        return out

    def another(self) -> S3Server:
        """A second server on another port, serving the same buckets (a test may stop it)."""
        return start_s3_server(self.bucket)

    def stop(self) -> None:
        self._server.stop()


def start_s3_server(bucket: str = "tunepipe-test") -> S3Server:
    """Start moto's S3 server on a free port of 127.0.0.1 and create `bucket` (if new)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = S3Server(f"http://{host}:{port}", bucket, server)
    client = s3.client()
    if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=bucket)
    return s3


def s3_env(endpoint: str, home: Path) -> dict[str, str]:
    """The environment that points AWS clients (boto3, s3fs) at `endpoint` with the dummy credentials."""
    return {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": DUMMY_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials"),  # absent files: no developer profile
        "AWS_CONFIG_FILE": str(home / "config"),
    }


def unique_prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    for module, package in [("moto.server", "moto[server]"), ("boto3", "boto3"), ("s3fs", "s3fs")]:
        pytest.importorskip(module, reason=f"the S3 tests need {package} (pip install {package})")
    server = start_s3_server()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in s3_env(server.endpoint, tmp_path_factory.mktemp("aws-home")).items():
            patch.setenv(name, value)
        try:
            yield server
        finally:
            server.stop()


if __name__ == "__main__":
    import time

    running = start_s3_server()
    print("S3 server running; for tunepipe (or the aws CLI) use:")
    for name, value in s3_env(running.endpoint, Path(tempfile.mkdtemp())).items():
        print(f"  export {name}={value}")
    print(f"  remote: {running.url('tunepipe')}\nCtrl-C stops it.")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        running.stop()
