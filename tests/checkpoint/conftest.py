"""Shared fixtures: a small prepared KJV data set with its BPE, and bucket checkpoints written as the orchestrator does."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from iota.checkpoint import bucket_manifest, stage_tensor_lists
from iota.data import Corpus, Prepared, load_prepared, load_tokenizer, prepare
from iota.model import Llama, ModelConfig, StageSpec, build_stage, plan_stages, preset
from iota.model.flat import encode_f32, flatten
from iota.storage import keys
from iota.storage.base import ObjectStore
from iota.storage.local import LocalStore
from iota.train.schedule import LRSchedule

RUN = "run-1"
N_STAGES = 3
SEQ_LEN = 32  # the test preset's


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    """The first 120 KJV chapters (~200k tokens) tokenized by a 512-token BPE, under data/kjv-part-bpe512."""
    root = tmp_path_factory.mktemp("data")
    corpus = Corpus("kjv-part", Corpus.kjv().documents[:120])
    tokenizer = load_tokenizer("bpe", root / "tokenizer-cache", corpus, 512)
    return load_prepared(prepare(corpus, tokenizer, root / "kjv-part-bpe512"))


def model_config(prepared: Prepared, bottleneck: int | None = None) -> ModelConfig:
    # A larger init than training uses, so logits are O(1) and comparisons are not near-zero noise.
    return preset("test", prepared.manifest.vocab_size, init_std=0.1, bottleneck=bottleneck)


def put_checkpoint(
    store: ObjectStore,
    prepared: Prepared,
    epoch: int,
    bottleneck: int | None = None,
    seed: int = 0,
) -> list[Llama]:
    """Write checkpoint `epoch` of RUN the way the orchestrator does (flats first, manifest last); its models."""
    config = model_config(prepared, bottleneck)
    stages = plan_stages(config.n_layers, N_STAGES)
    models = [build_stage(config, spec, seed=seed + epoch) for spec in stages]
    shas = []
    for spec, model in zip(stages, models, strict=True):
        data = encode_f32(flatten(model))
        store.put(keys.checkpoint_stage(RUN, epoch, spec.index), data)
        shas.append(hashlib.sha256(data).hexdigest())
    manifest = bucket_manifest(
        run_id=RUN,
        epoch=epoch,
        model=config,
        stages=stages,
        stage_keys=[keys.checkpoint_stage(RUN, epoch, s.index) for s in stages],
        stage_shas=shas,
        tensors_per_stage=stage_tensor_lists(config, stages),
        momentum={0: {0: "runs/run-1/epochs/0/merged/0/0/hk-momentum.f32"}} if epoch else {},
        tokens_trained=1000 * epoch,
        data_plan=prepared.plan(SEQ_LEN, seed=0, heldout_fraction=0.02),
        schedule=LRSchedule(peak_lr=1e-3, warmup_tokens=10, total_tokens=100_000),
        data_cursor=7 * epoch,
        tokenizer_kind="bpe",
        tokenizer_digest=prepared.manifest.tokenizer_digest,
        preset="test",
    )
    store.put(keys.checkpoint_manifest(RUN, epoch), json.dumps(manifest).encode())
    return models


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "bucket", secret=b"checkpoint-tests-secret", base_url="http://127.0.0.1:1")


def stage_specs(prepared: Prepared) -> list[StageSpec]:
    return plan_stages(model_config(prepared).n_layers, N_STAGES)


@pytest.fixture
def pulled(store: LocalStore, prepared: Prepared, tmp_path: Path) -> Callable[..., tuple[Path, list[Llama]]]:
    """Write a bucket checkpoint (bottleneck width as given) and pull it to a local directory."""
    from iota.checkpoint import pull_checkpoint

    def make(bottleneck: int | None = None) -> tuple[Path, list[Llama]]:
        models = put_checkpoint(store, prepared, 0, bottleneck)
        out = pull_checkpoint(store, RUN, 0, tmp_path / f"ckpt-{bottleneck}", prepared.directory)
        return out, models

    return make


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
