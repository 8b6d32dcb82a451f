"""The stage's new weights as the referee assembles them: accepted slices as checked, last epoch's values elsewhere."""

from __future__ import annotations

import torch

from iota.merge import DictStore, FlatRef, OuterConfig, Submitter, make_plan
from iota.model.flat import encode_f32
from iota.orchestrator.referee import Accepted, assemble


def test_assemble_takes_accepted_slices_and_keeps_last_epochs_values_elsewhere() -> None:
    bucket = DictStore()  # stands in for the object store: only its byte ranges are read
    previous = torch.arange(10, dtype=torch.float32)
    bucket.put("checkpoint/0", encode_f32(previous))
    plan = make_plan(
        run="r",
        epoch=0,
        stage=0,
        n_params=10,
        n_partitions=2,
        submitters=[Submitter(hotkey=h, upload_key=f"up/{h}", weight=1.0, claimed_norm=1.0) for h in "ab"],
        prev_weights=[FlatRef(key="checkpoint/0")] * 2,
        outer=OuterConfig(lr=0.7, momentum=0.9),
    )
    first, second = plan.partitions
    merged = torch.full((first.size,), 7.0)
    accepted = {0: Accepted(owner="a", weights=encode_f32(merged), momentum=encode_f32(merged))}
    flat = assemble(bucket, plan, accepted)  # type: ignore[arg-type]
    assert torch.equal(flat[first.start : first.end], merged)
    assert torch.equal(flat[second.start : second.end], previous[second.start : second.end])
