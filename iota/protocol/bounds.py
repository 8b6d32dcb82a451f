"""Bounded field types of the wire messages: every number, string, list and dict a peer sends has a limit.

The limits are checked while a body is parsed, so a value out of range is a 422 at the door, never a 500 further on
(an integer SQLite cannot store, a NaN no JSON response can carry) nor a record that bloats the state for good.
Each leaves honest traffic room to grow: the real sizes it must hold are in its comment, and
tests/security/test_field_bounds.py builds a 1b-class run's largest messages to check that they fit.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import AfterValidator, Field, StringConstraints

# -- integers ------------------------------------------------------------------------------------------------

INT64_MAX = 2**63 - 1  # the state database's BIGINT (SQLite, PostgreSQL)
MAX_COUNT = 2**53  # tokens, bytes, parameters, hops: ~9e15, and still exact as a float in any JSON reader
MAX_EPOCH = 2**31 - 1
MAX_STEP = 2**40  # inner steps: a million a day would take three thousand years to reach it
MAX_DIM = 2**24  # a model dimension or batch size: a vocabulary (128k), a context (128k tokens), a width
MAX_STAGES = 1024  # pipeline stages (a 1b run has 3, a 15b one a few dozen)
MAX_MINERS = 2**16  # miners, replicas, submitters to one merge: chain uids are 16-bit
MAX_PARTITIONS = 2**16  # of one stage's merge (16 by default)
MAX_TENSORS = 2**16  # of one stage: per-tensor norms of a weight sketch (a 1b stage has ~150)
MAX_SKETCH = 1024  # seeded projections of a weight sketch (8)
MAX_HOPS = 2**20  # hops of one miner in one epoch that an audit names (thousands in a long epoch)
MAX_SAMPLES = 2**24  # completed samples on a loss curve (a 1b run of 20B tokens has ~1.2M)
MAX_SHARDS = 2**16  # data shards
MAX_PIPELINE_DEPTH = 16  # requests for work one miner keeps in flight (MinerSettings.pipeline_depth's bound)
MAX_OBJECTS = 2**18  # objects one merge order or audit names: every upload, and two slices per partition
MAX_SNAPSHOTS = 4096  # challenged snapshots of one miner in one epoch that an audit names
# How far past its last committed step a miner's state may be when it takes a challenged snapshot: reports up to
# there are not held up by the answer (iota.orchestrator.challenges); a miner's state ring keeps this margin.
SNAPSHOT_LEAD = 4
MAX_SHAPE = 8  # dimensions of a tensor's shape
MAX_FLAGS = 256  # the operator's run flags
MAX_ERROR_KINDS = 64  # kinds of claim a verdict names an error for (forward, backward, merge...: a handful)

Int64 = Annotated[int, Field(ge=-INT64_MAX - 1, le=INT64_MAX)]
Id = Annotated[int, Field(ge=0, le=INT64_MAX)]  # a row of the state database: a hop, a sample
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Epoch = Annotated[int, Field(ge=0, le=MAX_EPOCH)]
Step = Annotated[int, Field(ge=0, le=MAX_STEP)]
Dim = Annotated[int, Field(ge=1, le=MAX_DIM)]
StageIndex = Annotated[int, Field(ge=0, lt=MAX_STAGES)]
PartitionIndex = Annotated[int, Field(ge=0, lt=MAX_PARTITIONS)]
Replicas = Annotated[int, Field(ge=1, le=MAX_MINERS)]
Uid = Annotated[int, Field(ge=0, lt=2**16)]
Version = Annotated[int, Field(ge=0, lt=2**16)]

# -- floats: finite only (JSON admits NaN and Infinity; no response could carry them back) ------------------

Finite = Annotated[float, Field(allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]

# -- strings -------------------------------------------------------------------------------------------------

MAX_NAME = 128  # a device, a session, a shard's file name, a flag's name, a claim kind
MAX_TEXT = 16 * 1024  # a reason or detail: a verdict's names its failed hops (three) and end-of-epoch claims
MAX_URL = 8192  # a presigned URL (S3's are 1-2 KiB)
MAX_KEY = 1024  # an object key: S3's limit

Hotkey = Annotated[str, StringConstraints(pattern=r"^[1-9A-HJ-NP-Za-km-z]{40,64}$")]  # ss58: base58
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]  # lower-case hex, as all roles write it
Md5 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
Ident = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]  # run and audit ids
Name = Annotated[str, StringConstraints(max_length=MAX_NAME)]
Text = Annotated[str, StringConstraints(max_length=MAX_TEXT)]
Url = Annotated[str, StringConstraints(max_length=MAX_URL)]
ObjectKey = Annotated[str, StringConstraints(min_length=1, max_length=MAX_KEY)]

# -- free-form JSON (a merge plan, a data plan, a schedule: validated by their own packages) ----------------

MAX_JSON_CHARS = 16 * 1024 * 1024  # a merge plan of 65k submitters and partitions, a data plan of 65k shards
MAX_JSON_DEPTH = 16  # a plan nests four or five deep
MAX_JSON_KEYS = 256  # at the top level


def _bounded_json(value: dict[str, Any]) -> dict[str, Any]:
    """At most MAX_JSON_DEPTH deep (checked first, without recursion) and MAX_JSON_CHARS of JSON, no NaN."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"nested deeper than {MAX_JSON_DEPTH}")
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    try:
        size = len(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(f"not plain JSON: {error}") from None
    if size > MAX_JSON_CHARS:
        raise ValueError(f"{size} characters of JSON, at most {MAX_JSON_CHARS}")
    return value


JsonObject = Annotated[dict[str, Any], Field(max_length=MAX_JSON_KEYS), AfterValidator(_bounded_json)]
