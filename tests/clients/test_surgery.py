"""Module surgery keeps the optimizer's references right and is undone exactly."""

import torch
from torch import nn

from fedsim.clients.surgery import replace_modules


class Scaled(nn.Module):
    """A replacement with new parameters of its own (and the original's, shared)."""

    def __init__(self, inner: nn.Linear) -> None:
        super().__init__()
        self.weight, self.bias = inner.weight, inner.bias
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.scale * nn.functional.linear(x, self.weight, self.bias)


def test_replacement_sharing_parameters_trains_the_originals_and_new_ones_join_the_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w0 = model[0].weight.detach().clone()
    undo = replace_modules(model, opt, lambda n, m: isinstance(m, nn.Linear), Scaled)
    assert isinstance(model[0], Scaled) and isinstance(model[2], Scaled)
    added = [q for g in opt.param_groups[1:] for q in g["params"]]
    assert len(added) == 2 and {id(q) for q in added} == {id(model[0].scale), id(model[2].scale)}
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert not torch.equal(model[0].weight, w0)
    assert float(model[0].scale) != 1.0
    trained = model[0].weight.detach().clone()
    undo()
    assert type(model[0]) is nn.Linear and torch.equal(model[0].weight, trained)


def test_replacement_with_new_parameter_objects_moves_the_optimizer_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    buf = opt.state[model[0].weight]["momentum_buffer"].clone()

    def copy(m):
        new = nn.Linear(3, 2)
        new.load_state_dict(m.state_dict())
        return new

    def back(old, new):
        old.load_state_dict(new.state_dict())

    undo = replace_modules(model, opt, lambda n, m: isinstance(m, nn.Linear), copy, restore=back)
    new_w = model[0].weight
    assert any(p is new_w for p in opt.param_groups[0]["params"])
    assert torch.equal(opt.state[new_w]["momentum_buffer"], buf)
    with torch.no_grad():
        new_w.add_(1.0)
    undo()
    assert torch.equal(model[0].weight, new_w)
