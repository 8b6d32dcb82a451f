"""Object storage: the ObjectStore interface, its S3 and local implementations, the key layout and transfers."""

from iota.storage.base import (
    InvalidKey,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    StoreError,
    check_key,
    etag_of,
    multipart_etag,
)
from iota.storage.local import LocalStore, URLRefused, local_store_router
from iota.storage.s3 import S3Store
from iota.storage.transfer import DigestMismatch, TooLarge, TransferError, download, upload

__all__ = [
    "DigestMismatch",
    "InvalidKey",
    "LocalStore",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "S3Store",
    "StoreError",
    "TooLarge",
    "TransferError",
    "URLRefused",
    "check_key",
    "download",
    "etag_of",
    "local_store_router",
    "multipart_etag",
    "upload",
]
