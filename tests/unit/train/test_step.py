import pytest
import torch

from llava_platform.train.step import optimizer_step, trainable_parameters


class Toy(torch.nn.Module):
    def __init__(self, scale=1.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
        self.scale = scale

    def forward(self, x):
        return type("Out", (), {"loss": (self.w * x).sum() * self.scale + (self.frozen * 0).sum()})()


def test_step_updates_trainable_only_and_clips():
    m = Toy()
    opt = torch.optim.SGD(trainable_parameters(m), lr=1.0)
    loss = optimizer_step(m, {"x": torch.tensor([3.0, 4.0, 0.0])}, opt, max_grad_norm=1.0)
    assert loss == pytest.approx(7.0)
    # gradient (3, 4, 0) clipped to unit norm -> (0.6, 0.8, 0)
    torch.testing.assert_close(m.w.detach(), torch.tensor([0.4, 0.2, 1.0]))
    assert torch.equal(m.frozen, torch.ones(3)) and m.w.grad is None


def test_non_finite_loss_raises_and_does_not_step():
    m = Toy(scale=float("nan"))
    opt = torch.optim.SGD(trainable_parameters(m), lr=1.0)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        optimizer_step(m, {"x": torch.ones(3)}, opt)
    assert torch.equal(m.w.detach(), torch.ones(3))
