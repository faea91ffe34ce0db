"""Sparsifier.attach_optimizer: an optimizer given after construction acts as one given to it."""
from __future__ import annotations

import torch
from torch import nn

from corrtools.sparse import Reset, Sparsifier


def _run(attach_late: bool) -> tuple[nn.Module, torch.optim.Optimizer, Sparsifier]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    exploit = Reset(every=2, reset_optimizer_state=True)
    if attach_late:
        sp = Sparsifier(model, None, density=0.25, exploit=exploit)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp.attach_optimizer(opt)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp = Sparsifier(model, opt, density=0.25, exploit=exploit)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    for i in range(5):
        opt.zero_grad()
        model(x).square().mean().backward()
        if i != 3:  # step 4 is skipped, as GradScaler would: sp.step() must not count it
            opt.step()
        sp.step()
    return model, opt, sp


def test_attach_optimizer_equals_passing_it_to_the_constructor():
    a, a_opt, a_sp = _run(attach_late=True)
    b, b_opt, b_sp = _run(attach_late=False)
    assert a_sp.steps_done == b_sp.steps_done == 4  # the skipped step is not counted either way
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
        assert torch.equal(a_opt.state[pa]["momentum_buffer"], b_opt.state[pb]["momentum_buffer"]), name
