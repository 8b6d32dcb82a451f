"""The object key layout: stable formats, refused components, and parsing back what was written."""

from __future__ import annotations

import pytest

from iota.storage import InvalidKey, check_key, keys

HOTKEY = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"


def test_formats_are_stable() -> None:
    # Other roles and old buckets depend on these exact strings: a change here is a migration.
    assert keys.run_config("r1") == "runs/r1/config.json"
    assert keys.data_shard("r1", "train-00001.bin") == "runs/r1/data/train-00001.bin"
    assert (
        keys.activation("r1", 3, 1042, 1, "forward", 0)
        == "runs/r1/activations/3/1042/1-forward-0.safetensors"
    )
    assert (
        keys.activation("r1", 3, 1042, 2, "backward", 1)
        == "runs/r1/activations/3/1042/2-backward-1.safetensors"
    )
    assert keys.pseudo_grad("r1", 3, 0, HOTKEY) == f"runs/r1/epochs/3/pseudo_grads/0/{HOTKEY}.f32"
    assert keys.merged_slice("r1", 3, 0, 7, HOTKEY) == f"runs/r1/epochs/3/merged/0/7/{HOTKEY}-weights.f32"
    assert (
        keys.merged_slice("r1", 3, 0, 7, HOTKEY, "momentum")
        == f"runs/r1/epochs/3/merged/0/7/{HOTKEY}-momentum.f32"
    )
    assert keys.merged_template("r1", 3, 0).format(
        partition=7, hotkey=HOTKEY, kind="weights"
    ) == keys.merged_slice("r1", 3, 0, 7, HOTKEY)
    assert keys.snapshot("r1", 3, 0, HOTKEY, 12) == f"runs/r1/epochs/3/snapshots/0/{HOTKEY}/12.safetensors"
    assert keys.checkpoint_stage("r1", 3, 2) == "runs/r1/checkpoints/3/stage-2.f32"
    assert keys.checkpoint_manifest("r1", 3) == "runs/r1/checkpoints/3/manifest.json"
    assert keys.scores("r1", 3) == "runs/r1/scores/3.json"


def test_every_key_is_a_valid_object_key_under_its_prefixes() -> None:
    made = [
        keys.run_config("r1"),
        keys.data_shard("r1", "shard_0"),
        keys.activation("r1", 0, 0, 0, "forward", 0),
        keys.pseudo_grad("r1", 0, 0, HOTKEY),
        keys.merged_slice("r1", 0, 0, 0, HOTKEY),
        keys.merged_slice("r1", 0, 0, 0, HOTKEY, "momentum"),
        keys.snapshot("r1", 0, 0, HOTKEY, 0),
        keys.checkpoint_stage("r1", 0, 0),
        keys.checkpoint_manifest("r1", 0),
        keys.scores("r1", 0),
    ]
    for key in made:
        assert check_key(key) == key
        assert key.startswith(keys.run_prefix("r1"))
    assert made[2].startswith(keys.activations_prefix("r1", 0)) and made[2].startswith(
        keys.activations_prefix("r1")
    )
    assert made[3].startswith(keys.pseudo_grads_prefix("r1", 0, 0))
    assert made[7].startswith(keys.checkpoint_prefix("r1", 0))
    assert len(set(made)) == len(made)


@pytest.mark.parametrize(
    "bad", ["", "..", ".", "a/b", "../x", "-flag", ".hidden", "a b", "x" * 129, "é", "a~"]
)
def test_bad_names_refused(bad: str) -> None:
    with pytest.raises(InvalidKey):
        keys.run_config(bad)
    with pytest.raises(InvalidKey):
        keys.pseudo_grad("r1", 0, 0, bad)
    with pytest.raises(InvalidKey):
        keys.data_shard("r1", bad)


@pytest.mark.parametrize("bad", [-1, True, 1.0, "1", None])
def test_bad_indices_refused(bad: object) -> None:
    with pytest.raises(InvalidKey):
        keys.activation("r1", bad, 0, 0, "forward", 0)  # type: ignore[arg-type]
    with pytest.raises(InvalidKey):
        keys.checkpoint_stage("r1", 0, bad)  # type: ignore[arg-type]


def test_direction_is_checked() -> None:
    with pytest.raises(InvalidKey, match="direction"):
        keys.activation("r1", 0, 0, 0, "sideways", 0)  # type: ignore[arg-type]


def test_parse_activation_round_trip() -> None:
    key = keys.activation("run-7", 12, 99999, 3, "backward", 2)
    parsed = keys.parse_activation(key)
    assert parsed == keys.ActivationKey("run-7", 12, 99999, 3, "backward", 2)
    assert parsed is not None and keys.activation(**vars(parsed)) == key


@pytest.mark.parametrize(
    "key",
    [
        "runs/r1/activations/3/1042/1-forward-0.bin",
        "runs/r1/activations/03/1042/1-forward-0.safetensors",  # not how activation() writes numbers
        "runs/r1/activations/3/1042/1-up-0.safetensors",
        "runs/r1/activations/3/1-forward-0.safetensors",
        "runs/r1/epochs/3/pseudo_grads/0/x.safetensors",
        "runs/../activations/3/1/1-forward-0.safetensors",
    ],
)
def test_parse_activation_rejects_other_keys(key: str) -> None:
    assert keys.parse_activation(key) is None


def test_parse_checkpoint_epoch() -> None:
    assert keys.parse_checkpoint_epoch(keys.checkpoint_stage("r1", 41, 2)) == 41
    assert keys.parse_checkpoint_epoch(keys.checkpoint_manifest("r1", 0)) == 0
    assert keys.parse_checkpoint_epoch("runs/r1/checkpoints/x/manifest.json") is None
    assert keys.parse_checkpoint_epoch(keys.scores("r1", 3)) is None
