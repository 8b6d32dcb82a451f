"""A real S3 endpoint for tests: moto's server on a free 127.0.0.1 port, one per session, and a fresh bucket per test.

Use from a conftest.py:  `from tests.support.s3 import moto_admin, moto_endpoint, s3_bucket  # noqa: F401`
Then a test takes `s3_bucket` and builds its store with `S3Store(**s3_bucket.store_kwargs())`; other processes
(iota subprocesses) reach the same server at `s3_bucket.endpoint_url`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

REGION = "us-east-1"
# moto accepts any credentials; fixed ones make presigned signatures reproducible in tests.
ACCESS_KEY = "testing-access-key"
SECRET_KEY = "testing-secret-key"


@dataclass(frozen=True)
class S3Bucket:
    """Where a test's bucket lives and the credentials that reach it."""

    endpoint_url: str
    bucket: str
    region: str = REGION
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY

    def store_kwargs(self) -> dict[str, Any]:
        """Arguments for iota.storage.S3Store."""
        return {
            "bucket": self.bucket,
            "endpoint_url": self.endpoint_url,
            "region": self.region,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
        }


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """URL of a moto S3 server running in this process for the whole session."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_admin(moto_endpoint: str) -> Any:
    """A boto3 S3 client on the moto server, for test setup (building a client takes a noticeable 0.2 s)."""
    session = boto3.session.Session(
        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name=REGION
    )
    return session.client("s3", endpoint_url=moto_endpoint)


@pytest.fixture
def s3_bucket(moto_endpoint: str, moto_admin: Any) -> S3Bucket:
    """A new, empty bucket on the session's moto server."""
    bucket = S3Bucket(endpoint_url=moto_endpoint, bucket=f"test-{uuid.uuid4().hex[:16]}")
    moto_admin.create_bucket(Bucket=bucket.bucket)
    return bucket
