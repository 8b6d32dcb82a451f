"""The outer step against torch.optim.SGD, the warm-up schedule, and the plain-averaging identity."""

import pytest
import torch

from iota.merge import OuterConfig, outer_lr, outer_step


@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_torch_sgd_over_several_steps(nesterov):
    torch.manual_seed(0)
    theta0 = torch.randn(10_000)
    grads = [torch.randn(10_000) * 0.1 for _ in range(5)]
    param = torch.nn.Parameter(theta0.clone())
    sgd = torch.optim.SGD([param], lr=0.7, momentum=0.9, nesterov=nesterov)
    theta, momentum = theta0.clone(), None
    for g in grads:
        param.grad = g.clone()
        sgd.step()
        theta, momentum = outer_step(theta, momentum, g, lr=0.7, mu=0.9, nesterov=nesterov)
        expected = param.detach()
        assert (theta - expected).norm() / expected.norm() < 1e-6
        assert torch.allclose(momentum, sgd.state[param]["momentum_buffer"], rtol=1e-6, atol=1e-7)


def test_plain_averaging_identity():
    """lr=1, momentum=0: theta_start - mean(theta_start - theta_end_i) is the mean of the replicas' end weights."""
    torch.manual_seed(1)
    start = torch.randn(10_000)
    ends = [start + torch.randn(10_000) * 0.05 for _ in range(3)]
    mean_grad = torch.zeros(10_000)
    for end in ends:
        mean_grad = mean_grad + (start - end) * torch.tensor(1 / 3)
    theta, momentum = outer_step(start, None, mean_grad, lr=1.0, mu=0.0, nesterov=True)
    mean_end = (ends[0].double() + ends[1].double() + ends[2].double()) / 3
    torch.testing.assert_close(theta.double(), mean_end, rtol=0, atol=1e-6)
    assert torch.equal(momentum, mean_grad)


def test_step_leaves_inputs_untouched_and_checks_dtypes():
    theta, grad, m = torch.ones(4), torch.ones(4), torch.ones(4)
    outer_step(theta, m, grad, lr=0.7, mu=0.9, nesterov=True)
    assert torch.equal(theta, torch.ones(4)) and torch.equal(m, torch.ones(4))
    with pytest.raises(ValueError, match="grad"):
        outer_step(theta, m, grad.double(), lr=0.7, mu=0.9, nesterov=True)
    with pytest.raises(ValueError, match="momentum"):
        outer_step(theta, torch.ones(5), grad, lr=0.7, mu=0.9, nesterov=True)


def test_warmup_is_linear_over_the_first_epochs():
    config = OuterConfig(lr=0.8, warmup_epochs=4)
    assert [outer_lr(config, e) for e in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8, 0.8])
    assert outer_lr(OuterConfig(), 0) == 0.7  # DiLoCo default, no warm-up
    assert OuterConfig().momentum == 0.9 and OuterConfig().nesterov
    with pytest.raises(ValueError):
        OuterConfig(momentum=1.0)
