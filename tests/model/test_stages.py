"""Stage plans and split models: a split without bottleneck is exactly the whole model; with one, shapes shrink."""

import dataclasses
import json

import pytest
import safetensors.torch
import torch

from iota.model import (
    PRESETS,
    Llama,
    ModelConfig,
    RopeScaling,
    StageSpec,
    autocast,
    build_full,
    build_stage,
    default_stages,
    loss_fn,
    pad_vocab,
    param_digest,
    plan_stages,
    preset,
    sum_loss,
)
from iota.model.llama import Bottleneck

SEED = 7


def send(tensor: torch.Tensor) -> torch.Tensor:
    """Cross a process boundary the way activations do: safetensors bytes, then a fresh leaf tensor."""
    payload = safetensors.torch.save({"t": tensor.detach().contiguous()})
    return safetensors.torch.load(payload)["t"]


def run_pipeline(
    stages: list[Llama], inputs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, list]:
    """Forward through every stage and backward again, each hop through bytes. Returns loss and wire shapes."""
    received: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    x = inputs
    for stage in stages:
        if not stage.spec.is_head:
            x = send(x).requires_grad_(True)
        received.append(x)
        out = stage(x)
        outputs.append(out)
        x = out
    loss = loss_fn(outputs[-1], targets)
    loss.backward()
    for index in range(len(stages) - 2, -1, -1):
        grad = send(received[index + 1].grad)
        assert grad.shape == outputs[index].shape
        outputs[index].backward(grad)
    wire_shapes = [tuple(out.shape) for out in outputs[:-1]]
    return loss.detach(), wire_shapes


def grads(model: Llama) -> dict[str, torch.Tensor]:
    return {name: param.grad for name, param in model.named_parameters()}


@pytest.mark.parametrize("layers_per_stage", [None, [2, 1, 1], [1, 1, 2]])
def test_split_without_bottleneck_equals_whole_model(
    config: ModelConfig, tokens: torch.Tensor, layers_per_stage: list[int] | None
) -> None:
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    full = build_full(config, SEED)
    full_loss = loss_fn(full(inputs), targets)
    full_loss.backward()
    full_grads = grads(full)

    stages = [build_stage(config, spec, SEED) for spec in plan_stages(config.n_layers, 3, layers_per_stage)]
    loss, wire_shapes = run_pipeline(stages, inputs, targets)

    assert wire_shapes == [(2, config.seq_len, config.hidden)] * 2
    torch.testing.assert_close(loss, full_loss.detach(), rtol=1e-6, atol=0)
    stage_grads = {name: grad for stage in stages for name, grad in grads(stage).items()}
    assert stage_grads.keys() == full_grads.keys()  # same names, every parameter owned by exactly one stage
    for name, full_grad in full_grads.items():
        assert full_grad is not None and full_grad.norm() > 0, name
        error = (stage_grads[name] - full_grad).norm() / full_grad.norm()
        assert error <= 1e-6, f"{name}: relative gradient error {error:.2e}"


def test_seeded_init_is_identical_across_plans(config: ModelConfig) -> None:
    full = dict(build_full(config, SEED).named_parameters())
    for layers_per_stage in ([1, 2, 1], [3, 1], [1, 1, 1, 1]):
        plan = plan_stages(config.n_layers, len(layers_per_stage), layers_per_stage)
        for spec in plan:
            for name, param in build_stage(config, spec, SEED).named_parameters():
                assert torch.equal(param, full[name]), f"{name} differs in stage {spec}"
    assert param_digest(build_full(config, SEED)) == param_digest(build_full(config, SEED))
    assert param_digest(build_full(config, SEED)) != param_digest(build_full(config, SEED + 1))


def test_init_statistics_and_distinct_tensors(config: ModelConfig) -> None:
    params = dict(build_full(config, SEED).named_parameters())
    assert torch.equal(params["layers.0.attn_norm.weight"], torch.ones(config.hidden))
    assert torch.equal(params["norm.weight"], torch.ones(config.hidden))
    embed = params["embed.weight"]
    assert abs(embed.std().item() - config.init_std) < 0.1 * config.init_std
    # Same shape, different names: different draws.
    assert not torch.equal(params["layers.0.attn.wq.weight"], params["layers.1.attn.wq.weight"])


def test_param_digest_sees_one_changed_value(config: ModelConfig) -> None:
    model = build_full(config, SEED)
    before = param_digest(model)
    with torch.no_grad():
        model.layers["2"].mlp.down.weight[3, 5] += 1e-6
    assert param_digest(model) != before


def test_bottleneck_shapes_and_backward(config: ModelConfig, tokens: torch.Tensor) -> None:
    b = 8
    config = dataclasses.replace(config, bottleneck=b)
    stages = [build_stage(config, spec, SEED) for spec in plan_stages(config.n_layers, 3)]
    loss, wire_shapes = run_pipeline(stages, tokens[:, :-1], tokens[:, 1:])

    assert wire_shapes == [(2, config.seq_len, b)] * 2
    assert torch.isfinite(loss)
    for stage in stages:
        for name, param in stage.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
            assert param.grad.norm() > 0, name
    names = [
        {name for name, _ in stage.named_parameters() if name.startswith("bottleneck.")} for stage in stages
    ]
    assert names[0] == {"bottleneck.norm.weight", "bottleneck.down.weight"}
    assert names[1] == {"bottleneck.up.weight", "bottleneck.norm.weight", "bottleneck.down.weight"}
    assert names[2] == {"bottleneck.up.weight"}
    # Each boundary starts from its own draw, although the parameter names repeat across stages.
    down0, down1 = (stage.bottleneck.down.weight for stage in stages[:2])
    up1, up2 = (stage.bottleneck.up.weight for stage in stages[1:])
    assert not torch.equal(down0, down1) and not torch.equal(up1, up2)
    # A whole model has no boundary, so no bottleneck.
    assert not any(name.startswith("bottleneck.") for name, _ in build_full(config, SEED).named_parameters())


def test_bottleneck_identity_path(config: ModelConfig) -> None:
    b = 8
    bottleneck = Bottleneck(dataclasses.replace(config, bottleneck=b), receives=True, sends=True)
    with torch.no_grad():
        bottleneck.up.weight.zero_()
        bottleneck.down.weight.zero_()
    h = torch.randn(2, 5, config.hidden)
    x = torch.randn(2, 5, b)
    # With the projections at zero only the identity path is left: the first b channels, carried unchanged.
    assert torch.equal(bottleneck.compress(h), h[..., :b])
    expanded = bottleneck.expand(x)
    assert torch.equal(expanded[..., :b], x) and torch.equal(
        expanded[..., b:], torch.zeros(2, 5, config.hidden - b)
    )


def test_sum_loss_normalises_by_token_count(config: ModelConfig, tokens: torch.Tensor) -> None:
    logits = torch.randn(2, config.seq_len, config.vocab_size)
    targets = tokens[:, 1:]
    torch.testing.assert_close(sum_loss(logits, targets) / targets.numel(), loss_fn(logits, targets))
    with pytest.raises(ValueError, match="reduction"):
        loss_fn(logits, targets, reduction="none")


def test_bf16_autocast_keeps_fp32_weights(config: ModelConfig, tokens: torch.Tensor) -> None:
    model = build_full(config, SEED)
    with autocast("cpu", enabled=True):
        logits = model(tokens[:, :-1])
    assert logits.dtype == torch.bfloat16
    loss = loss_fn(logits, tokens[:, 1:])
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    with autocast("cpu", enabled=False):
        assert model(tokens[:, :-1]).dtype == torch.float32


def test_head_takes_tokens_and_rejects_overlong_sequences(config: ModelConfig) -> None:
    head = build_stage(config, plan_stages(config.n_layers, 3)[0], SEED)
    assert head(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, config.hidden)
    with pytest.raises(ValueError, match="seq_len"):
        head(torch.zeros(1, config.seq_len + 1, dtype=torch.long))


@pytest.mark.parametrize(
    ("n_layers", "n_stages", "expected"),
    [
        (4, 3, [1, 2, 1]),
        (16, 3, [5, 6, 5]),
        (50, 5, [10] * 5),
        (7, 4, [2, 2, 2, 1]),
        (5, 2, [3, 2]),
        (3, 1, [3]),
    ],
)
def test_plan_stages_even_split(n_layers: int, n_stages: int, expected: list[int]) -> None:
    plan = plan_stages(n_layers, n_stages)
    assert [spec.last_layer - spec.first_layer for spec in plan] == expected
    assert plan[0].first_layer == 0 and plan[-1].last_layer == n_layers
    assert all(a.last_layer == b.first_layer for a, b in zip(plan, plan[1:], strict=False))
    assert [spec.index for spec in plan] == list(range(n_stages))
    assert plan[0].is_head and plan[-1].is_tail
    assert not any(spec.is_head or spec.is_tail for spec in plan[1:-1])


def test_plan_stages_uneven_explicit() -> None:
    plan = plan_stages(50, 5, [8, 11, 11, 11, 9])  # the public 15B split
    assert [(s.first_layer, s.last_layer) for s in plan] == [(0, 8), (8, 19), (19, 30), (30, 41), (41, 50)]


@pytest.mark.parametrize(
    ("n_layers", "n_stages", "layers_per_stage", "message"),
    [
        (4, 0, None, "n_stages"),
        (2, 3, None, "at least one layer"),
        (4, 3, [2, 2], "entries"),
        (4, 3, [2, 2, 0], "at least one layer"),
        (4, 3, [2, 2, 1], "sums to 5"),
    ],
)
def test_plan_stages_errors(
    n_layers: int, n_stages: int, layers_per_stage: list[int] | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        plan_stages(n_layers, n_stages, layers_per_stage)


def test_stage_spec_and_build_errors(config: ModelConfig) -> None:
    with pytest.raises(ValueError, match="out of range"):
        StageSpec(index=3, n_stages=3, first_layer=0, last_layer=1)
    with pytest.raises(ValueError, match="at least one layer"):
        StageSpec(index=0, n_stages=3, first_layer=2, last_layer=2)
    with pytest.raises(ValueError, match="the model has 4"):
        build_stage(config, StageSpec(index=1, n_stages=3, first_layer=2, last_layer=6), SEED)
    with pytest.raises(ValueError, match="tail"):
        build_stage(config, StageSpec(index=2, n_stages=3, first_layer=2, last_layer=3), SEED)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_heads": 5}, "divisible by n_heads"),
        ({"n_kv_heads": 3}, "divisible by n_kv_heads"),
        ({"bottleneck": 65}, "bottleneck"),
        ({"bottleneck": 0}, "bottleneck"),
        ({"hidden": 72, "n_heads": 8, "n_kv_heads": 2}, "even"),
        ({"n_layers": 0}, "n_layers"),
        ({"norm_eps": 0.0}, "norm_eps"),
        ({"init_std": -1.0}, "init_std"),
        ({"rope_scaling": {"low_freq_factor": 4.0, "high_freq_factor": 1.0}}, "low_freq_factor"),
        ({"no_such_field": 1}, "unknown"),
    ],
)
def test_config_validation(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        preset("test", 100, **overrides)


def test_config_round_trips_through_json() -> None:
    config = preset("15b", 128_256, bottleneck=80)
    assert config.vocab_size == 128_256  # already a multiple of 64
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    plain = preset("test", 100, rope_scaling=None)
    assert ModelConfig.from_dict(json.loads(json.dumps(plain.to_dict()))) == plain
    assert preset("test", 100, rope_scaling={"factor": 8.0}).rope_scaling == RopeScaling(factor=8.0)
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({**config.to_dict(), "extra": 1})


def test_presets() -> None:
    assert PRESETS == ("test", "tiny", "w512", "100m", "1b", "15b")
    assert [default_stages(name) for name in PRESETS] == [3, 3, 3, 3, 3, 5]
    w512 = preset("w512", 8192)  # wide enough for activation compression to matter (issue 17)
    assert (w512.hidden, w512.n_layers, w512.seq_len) == (512, 8, 256)
    assert pad_vocab(200) == 256 and pad_vocab(256) == 256 and pad_vocab(1) == 64
    assert preset("test", 200).vocab_size == 256
    assert all(preset(name, 50_000).bottleneck is None for name in PRESETS)
    assert 1.4e9 < preset("1b", 128_256).n_params() < 1.6e9  # the public 1.5B class
    assert 14e9 < preset("15b", 128_256).n_params() < 16e9
    with pytest.raises(ValueError, match="unknown preset"):
        preset("7b", 100)


@pytest.mark.parametrize(
    ("n_layers", "n_stages", "tail_cost", "expected"),
    [
        (6, 3, 1.45, [2, 3, 1]),  # tiny with a 4096-token BPE: the LM head is worth 1.45 blocks
        (16, 3, 4.32, [7, 7, 2]),  # 1b with Llama 3's vocabulary
        (50, 5, 2.39, [10, 11, 11, 10, 8]),  # 15b: near the public run's hand-made [8, 11, 11, 11, 9]
        (9, 3, 0.0, [3, 3, 3]),
        (3, 3, 5.0, [1, 1, 1]),  # every stage needs a block, however heavy the tail
    ],
)
def test_plan_stages_evens_out_compute_with_the_lm_head(
    n_layers: int, n_stages: int, tail_cost: float, expected: list[int]
) -> None:
    plan = plan_stages(n_layers, n_stages, tail_cost=tail_cost)
    counts = [spec.last_layer - spec.first_layer for spec in plan]
    assert counts == expected
    cost = [*counts[:-1], counts[-1] + tail_cost]
    even = [spec.last_layer - spec.first_layer for spec in plan_stages(n_layers, n_stages)]
    assert max(cost) <= max([*even[:-1], even[-1] + tail_cost])
    # No single block moved elsewhere lowers the most loaded stage's cost (the split is balanced).
    for a in range(n_stages):
        for b in range(n_stages):
            if a != b and counts[a] > 1:
                moved = list(cost)
                moved[a] -= 1
                moved[b] += 1
                assert max(moved) >= max(cost)


def test_lm_head_cost_of_the_presets() -> None:
    config = preset("1b", 128256)
    assert config.lm_head_cost() == pytest.approx(128256 * 2048 / config.block_params())
    assert 4 < config.lm_head_cost() < 5
