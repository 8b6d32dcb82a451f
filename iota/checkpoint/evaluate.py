"""Held-out loss of a checkpoint, on the very data plan it was trained with (found among prepared data sets)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from iota.checkpoint.local import compose, load_checkpoint
from iota.checkpoint.manifest import CheckpointError
from iota.data.plan import DataPlan, TokenData
from iota.data.prepare import MANIFEST_FILE as PREPARED_MANIFEST
from iota.train.run import heldout_loss

SEARCH_DEPTH = 2  # data_dir, its children and grandchildren: where `iota data prepare` and runs put data sets


def find_prepared(data_dir: Path, data_plan: Mapping[str, Any] | DataPlan) -> Path:
    """The prepared data directory under `data_dir` whose shards (names, sha256, sizes) are the plan's."""
    plan = data_plan if isinstance(data_plan, DataPlan) else DataPlan.from_dict(dict(data_plan))
    wanted = [shard.to_dict() for shard in plan.shards]
    data_dir = Path(data_dir)
    searched = []
    for directory in _candidates(data_dir):
        searched.append(directory)
        try:
            prepared = json.loads((directory / PREPARED_MANIFEST).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue  # unreadable, or some other kind of manifest: not a match either way
        if isinstance(prepared, dict) and prepared.get("shards") == wanted:
            return directory
    listed = ", ".join(str(d) for d in searched) or "no directory with a manifest.json"
    raise CheckpointError(
        f"no prepared data under {data_dir} matches the checkpoint's data plan (corpus "
        f"{plan.corpus_digest[:12]}, tokenizer {plan.tokenizer_name}, {len(plan.shards)} shards); searched: "
        f"{listed}. Prepare the run's corpus with the same tokenizer (`iota data prepare`)"
    )


def _candidates(data_dir: Path) -> list[Path]:
    if not data_dir.is_dir():
        raise CheckpointError(f"data directory {data_dir} does not exist")
    found: list[Path] = []
    level = [data_dir]
    for _ in range(SEARCH_DEPTH + 1):
        found.extend(d for d in level if (d / PREPARED_MANIFEST).is_file())
        level = sorted(child for d in level for child in d.iterdir() if child.is_dir())
    return found


def open_eval_data(checkpoint_dir: Path, data_dir: Path) -> TokenData:
    """The checkpoint's own data plan, read (sha256-checked) from the matching prepared directory in data_dir."""
    manifest = json.loads((Path(checkpoint_dir) / "manifest.json").read_text(encoding="utf-8"))
    if "data" not in manifest:
        raise CheckpointError(f"{checkpoint_dir}: the manifest records no data plan to evaluate on")
    plan = DataPlan.from_dict(manifest["data"])
    return TokenData.open(find_prepared(data_dir, plan), plan)


def evaluate(checkpoint_dir: Path, data: TokenData, n_samples: int, device: str = "cpu") -> dict[str, Any]:
    """Mean cross-entropy per token of the checkpoint on the first `n_samples` held-out sequences of `data`."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    checkpoint = load_checkpoint(checkpoint_dir)
    tokenizer_digest = checkpoint.manifest["tokenizer"]["digest"]
    if data.plan.tokenizer_digest != tokenizer_digest:
        raise CheckpointError(
            f"the data was tokenized by {data.plan.tokenizer_name} (digest {data.plan.tokenizer_digest[:16]}), "
            f"the checkpoint was trained with digest {tokenizer_digest[:16]}: the loss would mean nothing"
        )
    if data.plan.seq_len > checkpoint.config.seq_len:
        raise CheckpointError(
            f"the data plan's sequences ({data.plan.seq_len} tokens) are longer than the model's seq_len "
            f"{checkpoint.config.seq_len}"
        )
    model = compose(checkpoint, device)
    loss = heldout_loss(lambda tokens: model(tokens.to(device)).cpu(), data, n_samples)
    report: dict[str, Any] = {
        "checkpoint": str(checkpoint_dir),
        "run_id": checkpoint.manifest["run_id"],
        "epoch": checkpoint.epoch,
        "tokens_trained": checkpoint.tokens_trained,
        "eval_loss": loss,
        "n_samples": min(n_samples, data.plan.heldout_windows),
        "data_digest": data.plan.digest,
    }
    if "preset" in checkpoint.manifest:
        report["preset"] = checkpoint.manifest["preset"]
    return report


def eval_command(
    checkpoint_dir: Path, data_dir: Path, n_samples: int, report_path: Path | None = None, device: str = "cpu"
) -> dict[str, Any]:
    """`iota eval CHECKPOINT --report FILE`: evaluate on the checkpoint's own held-out data, write the report."""
    report = evaluate(checkpoint_dir, open_eval_data(checkpoint_dir, data_dir), n_samples, device)
    if report_path is not None:
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        Path(report_path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report
