"""The transport of the merge: the BlobStore protocol it reads and writes through, and the stores over it that
need no network: an in-memory one that counts each caller's traffic (tests, benches), and a view that serves a
caller's own objects from the bytes it holds."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

# What a failed read looks like: KeyError for an absent key (iota.storage's ObjectNotFound is one), RuntimeError
# for a store's refusal (its StoreError, e.g. a range past the end of a truncated object), OSError for the network.
READ_ERRORS = (KeyError, RuntimeError, OSError)


class BlobStore(Protocol):
    """The transport the merge needs: whole-object and byte-range reads, and writes. Keys are chosen by the plan."""

    def get(self, key: str) -> bytes:
        """The whole object; KeyError if absent."""
        ...

    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the object, END EXCLUSIVE; fewer if the object is shorter; KeyError if absent."""
        ...

    def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key`, replacing any previous object."""
        ...


class DictStore:
    """An in-memory BlobStore that counts the bytes it serves to and receives from each caller.

    `for_caller(name)` gives a view whose traffic is counted under `name`; direct calls count under "-".
    """

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.served: defaultdict[str, int] = defaultdict(int)  # bytes sent to the caller (its download)
        self.received: defaultdict[str, int] = defaultdict(int)  # bytes the caller stored (its upload)
        self.requests: defaultdict[str, int] = defaultdict(int)
        self._lock = threading.Lock()  # owners may fetch from several threads

    def for_caller(self, caller: str) -> CallerView:
        return CallerView(self, caller)

    def get(self, key: str, caller: str = "-") -> bytes:
        data = self.objects[key]
        self._count(caller, served=len(data))
        return data

    def get_range(self, key: str, start: int, end: int, caller: str = "-") -> bytes:
        if start < 0 or end < start:
            raise ValueError(f"byte range [{start}, {end}) is not valid")
        data = self.objects[key][start:end]
        self._count(caller, served=len(data))
        return data

    def put(self, key: str, data: bytes, caller: str = "-") -> None:
        self.objects[key] = bytes(data)
        self._count(caller, received=len(data))

    def reset_counts(self) -> None:
        with self._lock:
            self.served.clear()
            self.received.clear()
            self.requests.clear()

    def _count(self, caller: str, served: int = 0, received: int = 0) -> None:
        with self._lock:
            if served:
                self.served[caller] += served
            if received:
                self.received[caller] += received
            self.requests[caller] += 1


@dataclass(frozen=True)
class CallerView:
    """One caller's BlobStore view of a DictStore."""

    store: DictStore
    caller: str

    def get(self, key: str) -> bytes:
        return self.store.get(key, self.caller)

    def get_range(self, key: str, start: int, end: int) -> bytes:
        return self.store.get_range(key, start, end, self.caller)

    def put(self, key: str, data: bytes) -> None:
        self.store.put(key, data, self.caller)


@dataclass(frozen=True)
class HeldCopies:
    """A BlobStore that serves reads of objects the caller already holds (`held`: key -> the exact bytes it stored
    there) from memory: an owner reads its own upload's slices without crossing its link again.

    The bucket stays the record of what exists and its size: a range reaching past the bytes held (the merge's
    probe of an upload's last value and one byte beyond) goes to the store, so an upload missing or resized in the
    bucket is refused by this owner as by every other (`_read_upload_slice`)."""

    store: BlobStore
    held: Mapping[str, bytes]

    def get(self, key: str) -> bytes:
        return self.store.get(key)

    def get_range(self, key: str, start: int, end: int) -> bytes:
        data = self.held.get(key)
        if data is None or end > len(data):
            return self.store.get_range(key, start, end)
        if start < 0 or end < start:
            raise ValueError(f"byte range [{start}, {end}) is not valid")
        return data[start:end]

    def put(self, key: str, data: bytes) -> None:
        self.store.put(key, data)
