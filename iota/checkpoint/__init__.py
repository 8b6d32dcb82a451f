"""Checkpoints: the bucket and local formats, pulling, loading, composing, evaluating, exporting, generating."""

from iota.checkpoint.bucket import latest_epoch, pull_checkpoint
from iota.checkpoint.evaluate import eval_command, evaluate, find_prepared, open_eval_data
from iota.checkpoint.export import export_hf, export_native, llama3_hf_tokenizer, save_hf_tokenizer
from iota.checkpoint.generate import generate
from iota.checkpoint.local import Checkpoint, Pipeline, compose, load_checkpoint, write_local_checkpoint
from iota.checkpoint.manifest import (
    FORMAT,
    MANIFEST_FILE,
    CheckpointError,
    base_manifest,
    bucket_manifest,
    flat_to_state,
    stage_tensor_lists,
    tensor_list,
)

__all__ = [
    "FORMAT",
    "MANIFEST_FILE",
    "Checkpoint",
    "CheckpointError",
    "Pipeline",
    "base_manifest",
    "bucket_manifest",
    "compose",
    "eval_command",
    "evaluate",
    "export_hf",
    "export_native",
    "find_prepared",
    "flat_to_state",
    "generate",
    "latest_epoch",
    "llama3_hf_tokenizer",
    "load_checkpoint",
    "open_eval_data",
    "pull_checkpoint",
    "save_hf_tokenizer",
    "stage_tensor_lists",
    "tensor_list",
    "write_local_checkpoint",
]
