"""Micro-batching with activation checkpointing (GPipe, spec §B.22) and the loop's "forward" capability:
the full batch's gradients (1e-6 in float32, 1e-10 in float64), a lower measured peak memory, the event
order, BatchNorm statistics updated once, two forward owners refused."""

from __future__ import annotations

import ctypes
import sys

import pytest
import torch
from torch import nn

from fedsim.clients.plugin_api import ClientPlugin, Event, PluginStack
from fedsim.clients.plugins.microbatch import MicroBatch, accumulated_backward, checkpointed_forward, \
    peak_rss_increase
from fedsim.clients.trainer import train_local
from fedsim.errors import ConfigError
from fedsim.models import build_model
from tests.conftest import tiny


def _mlp(dtype, width=32, depth=4, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Flatten()]
    for i in range(depth):
        layers += [nn.Linear(16 if i == 0 else width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 5)).to(dtype)


def _grads(model, x, y, m, k):
    model.zero_grad()
    forward = checkpointed_forward(model, k) if k else model
    accumulated_backward(lambda a, b: nn.functional.cross_entropy(forward(a), b), x, y, m)
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-10)])
@pytest.mark.parametrize("m,k", [(1, 2), (2, 0), (3, 1), (5, 3), (37, 2), (64, 9)])
def test_gradients_equal_the_full_batch(dtype, tol, m, k):
    model = _mlp(dtype)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(37, 16, generator=g).to(dtype), torch.randint(0, 5, (37,), generator=g)
    full = _grads(model, x, y, 1, 0)
    got = _grads(model, x, y, m, k)
    for a, b in zip(full, got):
        assert torch.allclose(a, b, rtol=0, atol=tol * max(1.0, float(a.abs().max())))


_PEAK_SCRIPT = """
import ctypes, json, torch
from tests.clients.plugins.test_microbatch import _grads, _mlp, peak_rss_increase
libc = ctypes.CDLL("libc.so.6")
libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: large tensors go to the OS and come back when freed
libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD
torch.set_num_threads(1)
model = _mlp(torch.float32, width=256, depth=8)
x, y = torch.randn(1024, 16), torch.randint(0, 5, (1024,))

def peak(m, k):
    def step():
        _grads(model, x, y, m, k)
    step()
    return min(peak_rss_increase(step) for _ in range(2))

print(json.dumps([peak(1, 0), peak(4, 0), peak(4, 4), peak(1, 4)]))
"""


def test_peak_memory_falls_with_micro_batches_and_checkpointing():
    """Measured in a fresh process: the process-wide peak RSS and malloc settings of a test worker that
    ran other tests before would blur it."""
    import json
    import subprocess
    from pathlib import Path

    if not sys.platform.startswith("linux"):
        pytest.skip("peak resident memory is read from /proc (Linux)")
    root = Path(__file__).resolve().parents[3]
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], cwd=root, capture_output=True, text=True, check=True)
    full, m4, m4k4, k4 = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 1 << 20
    print(f"peak above resident: full {full / mib:.1f} MiB, M=4 {m4 / mib:.1f}, K=4 {k4 / mib:.1f}, "
          f"M=4 K=4 {m4k4 / mib:.1f}")
    assert full > 6 * mib  # 8 layers x 2 activations of 1 MiB are kept by the full batch
    assert m4 < 0.5 * full and k4 < 0.8 * full and m4k4 < m4


class Trace(ClientPlugin):
    name = "trace"
    events = frozenset(Event) - {Event.STEP}

    def __init__(self, settings=None):
        super().__init__(settings)
        self.log: list[tuple[str, int]] = []
        self.parts: list[torch.Tensor] = []

    def on(self, event, state):
        self.log.append((event.value, state.step))
        if event is Event.AFTER_FORWARD:
            bx, by = state.batch
            assert state.outputs.shape[0] == by.shape[0] == state.batch_indices.shape[0]
            assert torch.equal(bx, state.x[state.batch_indices])
            self.parts.append(state.batch_indices.clone())
        if event is Event.AFTER_BACKWARD:
            assert state.outputs.shape[0] == state.batch[1].shape[0] == state.batch_indices.shape[0]
            assert set(state.loss_terms) == {"ce"}


def _train(plugins, max_steps=3, model_cfg=(), n=30):
    s = tiny(list(model_cfg))
    cfg = s.client.model_copy(update={"batch_size": 10, "epochs": 1, "max_steps": max_steps})
    g = torch.Generator().manual_seed(0)
    shape = (1, 8, 8)
    x, y = torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)
    model = build_model(s.model, shape, 10, 0)
    stack = PluginStack(plugins)
    stack.trace = []
    res = train_local(model, x, y, cfg, stack, round=1, client_id=0, seed=0, rng=torch.Generator().manual_seed(1))
    return model, res, stack.trace


def test_the_loop_calls_the_forward_owner_with_events_per_micro_batch():
    plain, res_plain, _ = _train([])
    trace_plain = Trace()
    _train([trace_plain])
    tr = Trace()
    model, res, dispatched = _train([MicroBatch(MicroBatch.Settings(micro_batches=3, segments=2)), tr])
    assert ("forward_backward", "microbatch") in dispatched
    per_step = [e for e, s in tr.log if s == 0 and e not in ("init", "round_start", "epoch_start", "sampler")]
    assert per_step == ["batch"] + ["before_forward", "after_forward", "loss"] * 3 + \
        ["after_backward", "before_step", "after_step"]
    plain_events = [e for e, _ in trace_plain.log]
    assert [e for e, _ in tr.log if e not in ("before_forward", "after_forward", "loss")] == \
        [e for e in plain_events if e not in ("before_forward", "after_forward", "loss")]
    assert [p.tolist() for p in tr.parts[:3]] == [p.tolist() for p in torch.cat(tr.parts[:3]).tensor_split(3)]
    assert res.steps == res_plain.steps
    assert res.metrics["train_loss"] == pytest.approx(res_plain.metrics["train_loss"], rel=1e-5)
    for a, b in zip(plain.state_dict().values(), model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)  # the same steps: same gradients up to float32 rounding
    assert type(model).forward is nn.Sequential.forward and "forward" not in vars(model)  # unpatched


def test_neutral_is_bit_identical_and_batchnorm_statistics_are_updated_once():
    plain, _, _ = _train([])
    same, _, _ = _train([MicroBatch(MicroBatch.Settings.neutral())])
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), same.state_dict().values()))
    bn = ['model.name="cnn"', 'model.norm="batch"', "model.channels=[4]"]
    ref, _, _ = _train([], model_cfg=bn)
    ckpt, _, _ = _train([MicroBatch(MicroBatch.Settings(micro_batches=1, segments=3))], model_cfg=bn)
    for (k, a), b in zip(ref.state_dict().items(), ckpt.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), k  # recomputation never re-updates the stats


class OtherForward(ClientPlugin):
    name = "other_forward"
    owns = frozenset({"forward"})


def test_two_forward_owners_and_non_sequential_models_are_refused():
    with pytest.raises(ConfigError) as e:
        PluginStack([MicroBatch(), OtherForward()])
    assert "microbatch" in str(e.value) and "other_forward" in str(e.value) and "forward" in str(e.value)
    with pytest.raises(ConfigError) as e:
        tiny(['client.plugins=["microbatch"]', "client.microbatch.micro_batches=0"])
    assert e.value.key == "client.microbatch.micro_batches"

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(64, 10)

        def forward(self, x):
            return self.inner(x.flatten(1))

    from fedsim.clients.plugins.microbatch import _check_sequential
    with pytest.raises(ConfigError) as e:
        _check_sequential(Wrapped())
    assert e.value.key == "client.microbatch.segments"
