"""bench/memory.py: the fake-tensor estimate equals a live measurement, and the traffic formulas hold."""

import json

import pytest
import torch

from bench import memory
from iota.model import plan_stages, preset


def test_live_bytes_adds_allocations_and_takes_off_frees():
    tracker = memory.LiveBytes()
    with tracker:
        a = torch.empty(1000, dtype=torch.float32)
        b = torch.empty(500, dtype=torch.bfloat16)
        view = a[10:20]  # a view shares a's storage: no new bytes
        assert tracker.live == 4000 + 1000
        del a, b
        assert tracker.live == 4000  # the view still holds a's storage
        del view
    assert tracker.live == 0
    assert tracker.peak == 5000


@pytest.mark.parametrize("adamw", memory.ADAMW_KINDS)
def test_fake_estimate_matches_memtracker_on_real_tensors(adamw):
    config = preset("test", 512, bottleneck=8)
    for spec in plan_stages(config.n_layers, 3):
        estimate = memory.estimate_peaks(config, spec, 2, 32, adamw)
        live = memory.measure_peaks(config, spec, 2, 32, "cpu", adamw)
        assert estimate.static == live.static
        for phase in memory.PHASES:
            assert getattr(estimate, phase) == pytest.approx(getattr(live, phase), rel=0.01), (
                spec.index,
                phase,
            )
        assert estimate.forward_backward > estimate.static  # activations are counted at all


def test_stage_memory_counts_16p_on_device_and_graphs_in_flight():
    config = preset("test", 512)
    head, body, tail = plan_stages(config.n_layers, 3)
    one = memory.stage_memory("test", config, body, 2, 32, in_flight=1)
    four = memory.stage_memory("test", config, body, 2, 32, in_flight=4)
    assert one.weights + one.grads + one.optimizer == 16 * one.params
    assert one.host == 12 * one.params
    assert one.held > 0
    assert four.peak - one.peak == 3 * one.held
    # The tail runs its backward at once, so nothing is held across samples whatever the cache size.
    assert memory.stage_memory("test", config, tail, 2, 32, in_flight=4).in_flight == 1


def test_traffic_formulas():
    config = preset("test", 512, bottleneck=8)
    head, body, tail = plan_stages(config.n_layers, 3)
    params, n, replicas = 1_600_000, 16, 4
    kwargs = dict(batch=2, seq=32, wire_bytes=2, replicas=replicas, partitions=n, samples_per_epoch=64)
    body_traffic = memory.stage_traffic(config, body, params, **kwargs)
    head_traffic = memory.stage_traffic(config, head, params, **kwargs)
    tail_traffic = memory.stage_traffic(config, tail, params, **kwargs)
    one_transfer = 2 * 32 * 8 * 2  # B * T * b * bf16
    assert body_traffic.per_sample == 4 * one_transfer
    assert head_traffic.per_sample == tail_traffic.per_sample == 2 * one_transfer
    assert body_traffic.per_sample_full_width == 4 * 2 * 32 * config.hidden * 2
    assert body_traffic.train_epoch == 16 * body_traffic.per_sample  # 64 samples over 4 replicas
    assert body_traffic.merge_up == 4 * params + 16 * params // replicas
    assert body_traffic.merge_down == 12 * params + 8 * params // replicas


def test_gpu_for_allows_context_and_fragmentation():
    assert memory.gpu_for(10 * memory.GiB) == "16 GB"
    assert memory.gpu_for(14 * memory.GiB) == "24 GB"
    assert memory.gpu_for(200 * memory.GiB).startswith(">")


def test_main_writes_json_and_passes_its_check(tmp_path, capsys):
    out = tmp_path / "memory.json"
    assert memory.main(["--presets", "test", "--check", "test", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [row["stage"] for row in report["stages"]] == [0, 1, 2]
    assert report["passed"] is True and len(report["checks"]) == 3
    assert "| test | 1/3 |" in capsys.readouterr().out
