"""Both ObjectStores, served for real: LocalStore behind uvicorn on 127.0.0.1, S3Store on a moto server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from iota.storage import LocalStore, ObjectStore, S3Store, local_store_router
from iota.storage.base import MiB
from tests.support import running_server
from tests.support.s3 import S3Bucket, moto_admin, moto_endpoint, s3_bucket  # noqa: F401

SECRET = b"storage-tests-signing-secret"
PART_SIZE = 5 * MiB  # S3's minimum part size, so multipart is exercised with small objects


@pytest.fixture
def local_store(tmp_path: Path) -> Iterator[LocalStore]:
    """A LocalStore whose router is mounted under /storage of a real uvicorn server."""
    store = LocalStore(tmp_path / "objects", base_url="http://unset", secret=SECRET)
    app = FastAPI()
    app.include_router(local_store_router(store), prefix="/storage")
    with running_server(app) as url:
        store.base_url = f"{url}/storage"
        yield store


@pytest.fixture
def s3_store(s3_bucket: S3Bucket) -> S3Store:  # noqa: F811
    return S3Store(**s3_bucket.store_kwargs(), multipart_threshold=PART_SIZE, part_size=PART_SIZE)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest) -> ObjectStore:
    """Each test that takes `store` runs once per implementation."""
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client
