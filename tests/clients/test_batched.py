"""Vectorised fit (clients/batched.py, clients/batched_stacked.py): equal to the per-client path on both
batched kernels (stacked ``baddbmm`` and ``vmap``), falls back, deterministic."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fedsim.clients.batched import BatchedFit, message_eligible
from fedsim.clients.client_app import build_client_app
from fedsim.clients.tasks import ClientCall
from fedsim.wire import state_to_arrays
from fedsim.clients.runtime import runtime_for
from fedsim.engines.local import LocalGrid, node_id_for, run_local
from fedsim.results import load_checkpoint, read_jsonl
from tests.conftest import tiny

# unequal client sizes (Dirichlet label skew) → different step counts and short last batches
UNEQUAL = ['data.partitioner="dirichlet"', "data.partition={alpha=0.3, min_partition_size=5}",
           "data.num_clients=6", "client.batch_size=16"]
TOL = 1e-5
#: the two batched kernels: the stacked path (the default for Linear models) and torch.func's vmap
PATHS = ["stacked", "vmap"]


def _batcher(s, path="stacked", **kw) -> BatchedFit:
    """A batcher held to one kernel: ``vmap`` even for a model the stacked path could run."""
    b = BatchedFit(s, **kw)
    if path == "vmap":
        b._layers = None
    else:
        assert b.stacked_layers() is not None, "the test model must be one the stacked path runs"
    return b


def _used(b: BatchedFit, path: str) -> bool:
    return b.calls > 0 and b.stacked_calls == (b.calls if path == "stacked" else 0)


def _setup(overrides, num_clients=6):
    s = tiny(UNEQUAL + list(overrides))
    app = build_client_app(s)
    grid = LocalGrid(app, num_clients)
    arrays = state_to_arrays(runtime_for(s).model)
    return s, app, grid, arrays


def _msgs(arrays, pids, rnd=2, kind="train", plugins=""):
    """Train messages as a strategy sends them (``plugins``: the client plugins it enables)."""
    return [Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": rnd, "plugins": plugins})}),
                    dst_node_id=node_id_for(p), message_type=kind) for p in pids]


def _reference(app, grid, msgs):
    return [app(m, grid.contexts[m.metadata.dst_node_id]).content for m in msgs]


def _items(grid, msgs):
    return [(m, grid.contexts[m.metadata.dst_node_id]) for m in msgs]


def _assert_same(ref: RecordDict, got: RecordDict, tol=TOL):
    ra, ga = ref.array_records["arrays"], got.array_records["arrays"]
    assert list(ra.keys()) == list(ga.keys())
    for k in ra.keys():
        a, b = ra[k].numpy(), ga[k].numpy()
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.abs(a - b).max() <= tol, k
    rm, gm = dict(ref.metric_records["metrics"]), dict(got.metric_records["metrics"])
    assert list(rm) == list(gm)
    for k in ("partition-id", "num-examples", "steps", "sim-time"):
        assert rm[k] == gm[k], k
    assert gm["train_loss"] == pytest.approx(rm["train_loss"], abs=tol)
    # argmax may flip on a tie within rounding: at most one sample of difference
    assert abs(gm["train_accuracy"] - rm["train_accuracy"]) <= 1.0 / max(rm["steps"], 1) + 1e-9


def test_private_run_reply_matches_fit():
    # DP-FedAvg is a server mechanism: clients train plainly, but fit adds the label counts
    s, app, grid, arrays = _setup(['privacy.mechanism="dp-fedavg"', 'strategy.name="dp_fedavg"'])
    ref = _reference(app, grid, _msgs(arrays, range(6)))
    got = BatchedFit(s).run(_items(grid, _msgs(arrays, range(6))))
    for r, g in zip(ref, got):
        _assert_same(r, g)
        rm, gm = r.metric_records["metrics"], g.metric_records["metrics"]
        assert "label-counts" in rm and list(rm["label-counts"]) == list(gm["label-counts"])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("epochs,max_steps,wd", [(2, 0, 0.0), (3, 25, 1e-2)])
def test_equal_to_per_client_path(momentum, epochs, max_steps, wd, path):
    s, app, grid, arrays = _setup([f"client.momentum={momentum}", f"client.epochs={epochs}",
                                   f"client.max_steps={max_steps}", f"client.weight_decay={wd}"])
    pids = list(range(6))
    ref = _reference(app, grid, _msgs(arrays, pids))
    b = _batcher(s, path)
    got = b.run(_items(grid, _msgs(arrays, pids)))
    assert b.calls == 1 and b.clients == 6 and all(g is not None for g in got) and _used(b, path)
    sizes = {dict(r.metric_records["metrics"])["num-examples"] for r in ref}
    steps = {dict(r.metric_records["metrics"])["steps"] for r in ref}
    assert len(sizes) > 1 and len(steps) > 1  # unequal clients really were exercised
    if max_steps:
        assert max(steps) == max_steps
    for r, g in zip(ref, got):
        _assert_same(r, g)


@pytest.mark.parametrize("path", PATHS)
def test_tiny_and_empty_clients_stop_early_and_stay_untouched(path):
    # clients with 3 samples (one short step per epoch) and 0 samples (no step) train next to big ones:
    # after their last step their parameters and momentum must not move
    s, app, grid, arrays = _setup(["client.momentum=0.9", "client.epochs=2", "client.weight_decay=0.01"])
    rt = runtime_for(s)
    x, y = rt.client_data(0)
    rt._data[4] = (x[:3].clone(), y[:3].clone())
    rt._data[5] = (x[:0].clone(), y[:0].clone())
    ref = _reference(app, grid, _msgs(arrays, range(6)))
    b = _batcher(s, path)
    got = b.run(_items(grid, _msgs(arrays, range(6))))
    assert _used(b, path)
    steps = [dict(r.metric_records["metrics"])["steps"] for r in ref]
    assert steps[4] == 2 and steps[5] == 0 and min(steps[:4]) > 2
    for r, g in zip(ref, got):
        _assert_same(r, g)
    g5 = got[5].array_records["arrays"]
    assert all(np.array_equal(g5[k].numpy(), arrays[k].numpy()) for k in arrays.keys())
    assert dict(got[5].metric_records["metrics"])["train_loss"] == 0.0


def test_cnn_with_group_norm_and_chunks():
    s, app, grid, arrays = _setup(['model.name="cnn"', 'model.norm="group"', "model.channels=[4,8]",
                                   "client.momentum=0.5", "client.max_steps=6"])
    ref = _reference(app, grid, _msgs(arrays, range(6)))
    assert all(v is None for v in BatchedFit(s).run(_items(grid, _msgs(arrays, range(6)))))  # slower on CPU
    b = BatchedFit(s, when="eligible", max_chunk=4)
    got = b.run(_items(grid, _msgs(arrays, range(6))))
    assert b.calls == 2 and b.clients == 6
    assert b.stacked_layers() is None and b.stacked_calls == 0  # convolutions: the vmap kernel
    for r, g in zip(ref, got):
        _assert_same(r, g)


def test_stacked_and_vmap_kernels_agree_in_chunks():
    # two hidden layers, weight decay, momentum, short last batches, chunks of 4 and 2 clients: both
    # kernels, same replies
    s, app, grid, arrays = _setup(["model.hidden=[16, 8]", "client.momentum=0.9", "client.weight_decay=0.01",
                                   "client.epochs=2", "client.max_steps=0"])
    ref = _reference(app, grid, _msgs(arrays, range(6)))
    runs = {}
    for path in PATHS:
        b = _batcher(s, path, max_chunk=4)
        runs[path] = b.run(_items(grid, _msgs(arrays, range(6))))
        assert b.calls == 2 and b.clients == 6 and _used(b, path)
    for r, st, vm in zip(ref, runs["stacked"], runs["vmap"]):
        _assert_same(r, st)
        _assert_same(vm, st, tol=1e-6)
        assert dict(st.metric_records["metrics"]) == pytest.approx(dict(vm.metric_records["metrics"]), abs=1e-6)


def test_stacked_plan_takes_verified_linear_models_only():
    from torch import nn

    from fedsim.clients.batched_stacked import stacked_plan

    class MyLinear(nn.Linear):  # a subclass may compute anything
        pass

    class Net(nn.Module):  # not a Sequential: its forward is unknown
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) * 2

    ok = [nn.Sequential(nn.Flatten(), nn.Linear(64, 3)),
          nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(64, 8), nn.GELU()), nn.Identity(),
                        nn.Sequential(nn.Linear(8, 8, bias=False), nn.LeakyReLU(0.2)), nn.Linear(8, 3))]
    hooked = nn.Sequential(nn.Linear(4, 2))
    hooked[0].register_forward_hook(lambda m, i, o: o * 0)
    refused = {"Conv2d": nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 3)),
               "MyLinear": nn.Sequential(MyLinear(4, 2)),
               "Net": nn.Sequential(Net()),
               "hooks": hooked,
               "Dropout": nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2)),
               "Softmax": nn.Sequential(nn.Linear(4, 2), nn.LogSoftmax(dim=1)),
               "batch dimension": nn.Sequential(nn.Flatten(0), nn.Linear(4, 2)),
               "PReLU": nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.Linear(4, 2))}
    for model in ok:
        layers, why = stacked_plan(model)
        assert why is None and len(layers) >= 2
    for word, model in refused.items():
        layers, why = stacked_plan(model)
        assert layers is None and word in why, (word, why)


def test_stacked_step_gives_each_client_exactly_its_own_gradient():
    # three clients with their own parameters, a padded (masked) short batch: the stacked step's loss,
    # logits and gradients equal each client's own autograd, computed one by one
    import copy

    import torch
    from torch import nn

    from fedsim.clients.batched_stacked import stacked_plan, stacked_step

    torch.manual_seed(0)
    proto = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(12, 7), nn.Tanh()),
                          nn.Linear(7, 5, bias=False), nn.ELU(), nn.Linear(5, 4), nn.SiLU(), nn.Linear(4, 3))
    clients = [copy.deepcopy(proto) for _ in range(3)]
    for m in clients:
        with torch.no_grad():
            for p in m.parameters():
                p.normal_()
    names = [k for k, _ in proto.named_parameters()]
    ps = [torch.stack([dict(m.named_parameters())[k].detach() for m in clients]) for k in names]
    x, y = torch.randn(3, 6, 3, 4), torch.randint(0, 3, (3, 6))
    mask = torch.ones(3, 6)
    mask[1, 4:] = 0.0  # client 1: a short batch of 4 real samples, 2 padded
    cnt = mask.sum(1)
    layers, _ = stacked_plan(proto)
    grads, loss, out = stacked_step(layers, ps, x, y, mask, cnt)
    for c, m in enumerate(clients):
        n = int(cnt[c])
        logits = m(x[c])
        own = nn.functional.cross_entropy(logits[:n], y[c, :n])
        own.backward()
        assert torch.allclose(loss[c], own, atol=1e-6) and torch.allclose(out[c], logits, atol=1e-6)
        for g, (k, p) in zip(grads, m.named_parameters()):
            assert torch.allclose(g[c], p.grad, atol=1e-5, rtol=1e-5), (c, k)


@pytest.mark.parametrize("overrides", [
    ['client.plugins=["fedprox"]'],
    ['strategy.name="fedprox"'],
    ['client.optimizer="adam"'],
    ['model.name="cnn"', 'model.norm="batch"', "model.channels=[4]"],
    ["model.dropout=0.2"],
])
def test_ineligible_scenarios_fall_back(overrides):
    from fedsim.strategies.base import STRATEGIES

    s, app, grid, arrays = _setup(overrides)
    b = BatchedFit(s, when="eligible")
    plugins = ",".join(STRATEGIES.get(s.strategy.name).plugin_names(s))  # what the strategy sends
    assert b.run(_items(grid, _msgs(arrays, range(6), plugins=plugins))) == [None] * 6
    assert b.reason() is not None
    assert b.calls == 0


def test_faulty_and_other_messages_go_per_client():
    s, app, grid, arrays = _setup(["faults.crash_clients=[1]", "faults.byzantine_clients=[3]",
                                   'faults.attack="sign_flip"'])
    msgs = _msgs(arrays, range(6)) + _msgs(arrays, [0], kind="evaluate") + _msgs(arrays, [2], kind="train.other")
    eligible = [message_eligible(ClientCall(runtime_for(s), m, grid.contexts[m.metadata.dst_node_id]))
                for m in msgs]
    assert eligible == [True, False, True, False, True, True, False, False]
    b = BatchedFit(s)
    got = b.run(_items(grid, msgs))
    assert [g is not None for g in got] == eligible and b.clients == 4


def test_local_grid_push_mixes_paths_and_keeps_contexts():
    s, app, grid, arrays = _setup(["faults.crash_clients=[1]", "faults.crash_rounds=[2]", "client.momentum=0.9"])
    ref = _reference(app, grid, [m for m in _msgs(arrays, range(6)) if m.metadata.dst_node_id != node_id_for(1)])
    contexts = dict(grid.contexts)
    grid.batcher = BatchedFit(s)
    msgs = _msgs(arrays, range(6))
    replies = list(grid.send_and_receive(msgs))
    assert grid.batcher.calls == 1 and grid.batcher.clients == 5
    assert [r.metadata.src_node_id for r in replies] == [node_id_for(p) for p in range(6)]
    assert [r.metadata.reply_to_message_id for r in replies] == [m.metadata.message_id for m in msgs]
    assert replies[1].has_error() and "InjectedCrash" in replies[1].error.reason
    for r, g in zip(ref, [r for i, r in enumerate(replies) if i != 1]):
        assert not g.has_error()
        _assert_same(r, g.content)
    assert grid.contexts == contexts and all(len(c.state) == 0 for c in grid.contexts.values())


def test_failure_of_the_vectorised_call_falls_back(monkeypatch):
    s, app, grid, arrays = _setup([])
    ref = _reference(app, grid, _msgs(arrays, range(6)))
    grid.batcher = BatchedFit(s)

    def boom(self, clients):
        raise RuntimeError("vmap cannot batch this")

    monkeypatch.setattr(BatchedFit, "_train_chunk", boom)
    with pytest.warns(RuntimeWarning, match="vmap cannot batch this"):
        replies = list(grid.send_and_receive(_msgs(arrays, range(6))))
    assert grid.batcher.calls == 0
    for r, g in zip(ref, replies):  # the per-message path: bit for bit
        _assert_same(r, g.content, tol=0.0)


def test_run_local_vectorised_is_deterministic_and_close(tmp_path):
    over = UNEQUAL + ["client.momentum=0.9", "run.rounds=3", "strategy.fraction_train=0.5"]
    grids = []
    a = run_local(tiny(over + ["run.vectorize=true"]), tmp_path / "a", grid_hook=grids.append)
    assert isinstance(grids[0].batcher, BatchedFit) and grids[0].batcher.calls == 3
    assert grids[0].batcher.clients == 9  # 3 rounds × 3 sampled clients
    b = run_local(tiny(over + ["run.vectorize=true"]), tmp_path / "b")
    c = run_local(tiny(over + ["run.vectorize=false"]), tmp_path / "c", grid_hook=grids.append)
    assert grids[-1].batcher is None  # false: every client through the ClientApp
    assert c["vectorized"] == {"used": False, "reason": "run.vectorize = false"}
    assert a["vectorized"]["used"] and a["vectorized"]["clients_batched"] == 9
    ra, rb, rc = ([{k: v for k, v in r.items() if k != "wall_s"} for r in read_jsonl(tmp_path / d / "metrics.jsonl")]
                  for d in "abc")
    assert ra == rb  # same seed, same results (bit for bit)
    assert a["final"]["test_loss"] == b["final"]["test_loss"]
    assert a["final"]["test_loss"] == pytest.approx(c["final"]["test_loss"], abs=1e-4)
    for x, y in zip(ra[1:], rc[1:]):
        assert x["num-clients"] == y["num-clients"]
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-4)
    ma = load_checkpoint(tmp_path / "a" / "checkpoints" / "round_0003.npz")["model"]
    mc = load_checkpoint(tmp_path / "c" / "checkpoints" / "round_0003.npz")["model"]
    assert max(float(np.abs(x - y).max()) for x, y in zip(ma, mc)) <= 1e-4


@pytest.mark.parametrize("path", PATHS)
def test_batch_larger_than_every_client(path):
    # batch_size above every client's size: one (padded) batch per epoch, same as per client
    s, app, grid, arrays = _setup(["client.batch_size=1000", "client.epochs=4", "client.momentum=0.9"])
    ref = _reference(app, grid, _msgs(arrays, range(6)))
    b = _batcher(s, path)
    got = b.run(_items(grid, _msgs(arrays, range(6))))
    assert _used(b, path)
    for r, g in zip(ref, got):
        assert dict(r.metric_records["metrics"])["steps"] == 4
        _assert_same(r, g)


def test_plugins_reaching_the_loop_any_other_way_are_detected(monkeypatch):
    # even if the static checks miss a plugin, the stack the per-message path would build is checked
    import fedsim.clients.batched as batched

    s, app, grid, arrays = _setup(['strategy.name="fedprox"'])
    monkeypatch.setattr(batched, "scenario_reason", lambda scenario, model: None)
    b = BatchedFit(s)
    assert b.run(_items(grid, _msgs(arrays, range(6), plugins="fedprox"))) == [None] * 6
    assert "fedprox" in b.reason()


# --- the batched path as the local engine's default (run.vectorize = "auto") ---------------------------
def test_vectorize_setting_default_values_and_refusal():
    from fedsim.clients.batched import batcher_for
    from fedsim.errors import ConfigError

    assert tiny().run.vectorize == "auto"
    assert batcher_for(tiny()).when == "faster"
    assert batcher_for(tiny(["run.vectorize=true"])).when == "eligible"
    assert batcher_for(tiny(["run.vectorize=false"])) is None
    with pytest.raises(ConfigError, match="run.vectorize"):
        tiny(['run.vectorize="sometimes"'])


def test_default_run_batches_and_a_plugin_set_falls_back_with_its_reason(tmp_path, caplog):
    import json
    import logging

    grids = []
    plain = run_local(tiny(), tmp_path / "plain", grid_hook=grids.append)
    assert isinstance(grids[0].batcher, BatchedFit) and grids[0].batcher.calls == 2  # one call per round
    assert plain["vectorized"]["used"] and plain["vectorized"]["reason"] is None
    with caplog.at_level(logging.INFO, logger="flwr"):
        prox = run_local(tiny(['client.plugins=["fedprox"]', "client.fedprox.mu=0.1"]), tmp_path / "prox")
    recorded = json.loads((tmp_path / "prox" / "summary.json").read_text())["vectorized"]
    assert recorded == prox["vectorized"] and recorded["used"] is False
    assert "fedprox" in recorded["reason"] and recorded["clients_batched"] == 0
    assert recorded["clients_per_client"] == 8  # 2 rounds × 4 clients, each trained one by one
    logged = [r for r in caplog.records if "clients train one by one" in r.getMessage()]
    assert len(logged) == 1 and "fedprox" in logged[0].getMessage()  # once, not per round or client


def test_faulty_clients_are_counted_per_reason(tmp_path):
    s = tiny(["faults.crash_clients=[1]", "faults.crash_rounds=[1, 2]", "strategy.fraction_train=1.0",
              "run.on_failed_round=\"continue\""])
    v = run_local(s, tmp_path)["vectorized"]
    assert v["used"] and v["clients_batched"] == 6 and v["clients_per_client"] == 2
    assert v["per_client_reasons"] == {"a fault (crash or dropout) hits the client this round": 2}


def test_vectorize_true_batches_convolutions_on_cpu_too(tmp_path):
    over = ['model.name="cnn"', 'model.norm="group"', "model.channels=[4,8]", "run.rounds=1"]
    grids = []
    auto = run_local(tiny(over), tmp_path / "auto", grid_hook=grids.append)
    forced = run_local(tiny(over + ["run.vectorize=true"]), tmp_path / "forced", grid_hook=grids.append)
    assert not auto["vectorized"]["used"] and "convolutions" in auto["vectorized"]["reason"]
    assert forced["vectorized"]["used"] and grids[1].batcher.calls == 1
    assert forced["final"]["test_loss"] == pytest.approx(auto["final"]["test_loss"], abs=1e-5)


# built-in scenarios the default batches (pinned: a change that silently stops batching one fails here)
BATCHED_BUILTINS = {"byzantine_median", "default", "double_descent", "dp_fedavg_digits", "dp_ftrl_digits",
                    "faults_dropout", "separable_logreg", "temporal_drift"}


@pytest.mark.slow
def test_default_path_equals_per_client_path_on_every_builtin_scenario_it_batches(tmp_path):
    from pathlib import Path

    from fedsim.catalog import resolve
    from fedsim.config import load_scenario

    def run(path, setting):
        out = tmp_path / f"{path.stem}-{setting}"
        s = resolve(load_scenario(path, ["run.rounds=2", "run.checkpoint_every=2", "run.progress=false",
                                         f"run.vectorize={setting}"]))
        summary = run_local(s, out)
        assert summary["status"] == "completed", path
        return summary, load_checkpoint(out / "checkpoints" / "round_0002.npz")["model"]

    batched = set()
    for path in sorted((Path(__file__).parents[2] / "scenarios").glob("*.toml")):
        s = resolve(load_scenario(path))
        why = BatchedFit(s).reason()  # scenario-wide reasons need no run
        if why is not None:
            assert path.stem not in BATCHED_BUILTINS, (path.stem, why)
            continue
        auto, model_auto = run(path, '"auto"')
        if not auto["vectorized"]["used"]:
            assert auto["vectorized"]["reason"], path.stem  # fell back: the reason is recorded
            continue
        batched.add(path.stem)
        per_client, model_pc = run(path, "false")
        assert per_client["vectorized"]["used"] is False
        diff = max(float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(model_auto, model_pc))
        assert diff <= 1e-5, (path.stem, diff)
        assert auto["final"]["test_loss"] == pytest.approx(per_client["final"]["test_loss"], abs=1e-5), path.stem
    assert batched == BATCHED_BUILTINS


def test_batched_path_on_cuda_matches_the_per_client_path():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine: the GPU path of run.device = \"auto\" cannot be checked")
    s, app, grid, arrays = _setup(["client.momentum=0.9", 'run.device="auto"'])
    rt = runtime_for(s)
    assert rt.device.type == "cuda" and rt.client_data(0)[0].device.type == "cuda"
    ref = _reference(app, grid, _msgs(arrays, range(6)))
    b = BatchedFit(s)
    got = b.run(_items(grid, _msgs(arrays, range(6))))
    assert b.calls == 1 and b.clients == 6
    for r, g in zip(ref, got):
        _assert_same(r, g, tol=1e-4)  # GPU kernels (TF32 off by default for float32 matmul) round differently
    cnn, *_ = _setup(['model.name="cnn"', 'model.norm="group"', "model.channels=[4,8]", 'run.device="auto"'])
    assert BatchedFit(cnn).reason() is None  # convolutions are vectorised on the accelerator by default
