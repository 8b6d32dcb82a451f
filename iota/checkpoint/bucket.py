"""Reading the orchestrator's bucket checkpoints: find the latest, verify its flats, pull it to a local directory."""

from __future__ import annotations

import hashlib
from pathlib import Path

from iota.checkpoint.local import write_local_checkpoint
from iota.checkpoint.manifest import (
    CheckpointError,
    decode_flat,
    expected_tensors,
    flat_to_state,
    load_manifest,
    n_params,
    parse_manifest,
)
from iota.data.tokenizer import Tokenizer, load_tokenizer
from iota.storage import keys
from iota.storage.base import ObjectNotFound, ObjectStore


def latest_epoch(store: ObjectStore, run_id: str) -> int | None:
    """The highest epoch of `run_id` whose manifest exists (it is written last, so that checkpoint is complete)."""
    epochs = []
    for key in store.list(keys.checkpoints_prefix(run_id)):
        epoch = keys.parse_checkpoint_epoch(key)
        if epoch is not None and key == keys.checkpoint_manifest(run_id, epoch):
            epochs.append(epoch)
    return max(epochs, default=None)


def pull_checkpoint(
    store: ObjectStore, run_id: str, epoch: int, out_dir: Path, tokenizer_dir: Path | None = None
) -> Path:
    """Download checkpoint `epoch` of `run_id` into the local format at `out_dir`, each flat's size and sha256
    checked. For a BPE run, pass `tokenizer_dir`: a directory holding the run's tokenizer.json (the prepared
    data directory, see `find_prepared`), so the checkpoint carries its tokenizer. Returns `out_dir`.
    """
    manifest_key = keys.checkpoint_manifest(run_id, epoch)
    try:
        raw = store.get(manifest_key)
    except ObjectNotFound:
        latest = latest_epoch(store, run_id)
        have = f"the latest complete one is epoch {latest}" if latest is not None else "it has none yet"
        raise CheckpointError(
            f"run {run_id!r} has no checkpoint for epoch {epoch} ({manifest_key} is absent); {have}"
        ) from None
    manifest = load_manifest(raw, manifest_key)
    config, stages = parse_manifest(manifest, manifest_key)
    if manifest["run_id"] != run_id or int(manifest["epoch"]) != epoch:
        raise CheckpointError(
            f"{manifest_key} describes run {manifest['run_id']!r} epoch {manifest['epoch']}, "
            f"not run {run_id!r} epoch {epoch}"
        )
    tokenizer = _tokenizer(manifest["tokenizer"], tokenizer_dir)  # before downloading gigabytes
    states = []
    for entry, spec in zip(manifest["stages"], stages, strict=True):
        where = f"{manifest_key}: stage {spec.index}"
        tensors = entry.get("tensors", [])
        expected = expected_tensors(config, spec)
        if sorted(map(tuple, map(_plain, tensors))) != sorted(map(tuple, map(_plain, expected))):
            raise CheckpointError(
                f"{where}: the tensor list does not match the stage the model config describes"
            )
        if entry.get("n_params") != n_params(expected):
            raise CheckpointError(f"{where}: n_params {entry.get('n_params')} != {n_params(expected)}")
        try:
            data = store.get(entry["key"])
        except ObjectNotFound:
            raise CheckpointError(
                f"{where}: the flat weights {entry['key']} are missing from the store"
            ) from None
        expected_bytes = 4 * n_params(expected)
        if len(data) != expected_bytes:
            raise CheckpointError(
                f"{where}: {entry['key']} holds {len(data)} bytes, expected {expected_bytes}"
            )
        sha = hashlib.sha256(data).hexdigest()
        if sha != entry.get("sha256"):
            raise CheckpointError(
                f"{where}: sha256 of {entry['key']} is {sha}, the manifest records {entry.get('sha256')} "
                "(corrupted or overwritten)"
            )
        states.append(flat_to_state(decode_flat(data), expected))
        del data
    return write_local_checkpoint(out_dir, manifest, states, tokenizer)


def _plain(item: list | tuple) -> tuple[str, tuple[int, ...]]:
    name, shape = item
    return str(name), tuple(int(d) for d in shape)


def _tokenizer(info: dict, tokenizer_dir: Path | None) -> Tokenizer | None:
    # Only a BPE has files to copy; the Llama 3 vocabulary ships inside splintr and the manifest names it.
    if info["kind"] != "bpe" or tokenizer_dir is None:
        return None
    tokenizer = load_tokenizer("bpe", Path(tokenizer_dir))
    if tokenizer.digest != info["digest"]:
        raise CheckpointError(
            f"the tokenizer in {tokenizer_dir} (digest {tokenizer.digest[:16]}) is not the run's "
            f"(digest {str(info['digest'])[:16]}): pass the prepared data directory the run trained on"
        )
    return tokenizer
