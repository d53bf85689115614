"""normalized_gd and gns_newton (clients/transforms_newton.py) against direct computations."""

import torch

from fedsim.clients.transforms_newton import GNSNewton, NormalizedGD, gns_step, normalized_direction


def _quadratic(n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, n, generator=gen, dtype=torch.float64)
    a = q @ q.T + 0.5 * torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    return a, b, (lambda x: 0.5 * x @ a @ x - b @ x)


def test_normalized_direction_is_grad_over_loss_and_invariant_to_scaling_the_loss():
    g = {"w": torch.tensor([0.3, -1.2])}
    d = normalized_direction(g, torch.tensor(0.6))
    torch.testing.assert_close(d["w"], g["w"] / 0.6)
    scaled = normalized_direction({"w": g["w"] * 7.0}, torch.tensor(0.6 * 7.0))
    torch.testing.assert_close(scaled["w"], d["w"])
    zero = normalized_direction({"w": torch.zeros(2)}, 0.0)
    assert torch.equal(zero["w"], torch.zeros(2))  # a zero loss gives no step, never NaN


def test_normalized_gd_on_separable_data_drives_the_margin_up():
    from fedsim.data.separable import separable

    data = separable(0, 0.2, num_samples=400, dim=5, margin=0.05)
    x, y = torch.as_tensor(data.x_train), torch.as_tensor(data.y_train)
    w = {"w": torch.zeros(5), "b": torch.zeros(())}
    sign = 2.0 * y - 1.0
    t = NormalizedGD()

    def loss_of(p):
        return torch.nn.functional.softplus(-sign * (x @ p["w"] + p["b"])).mean()

    margins = []
    for _ in range(60):
        p = {k: v.clone().requires_grad_(True) for k, v in w.items()}
        loss = loss_of(p)
        grads = dict(zip(p, torch.autograd.grad(loss, list(p.values()))))
        d, _ = t.update(grads, {}, w, loss=loss.detach())
        w = {k: v - 1.0 * d[k] for k, v in w.items()}
        margins.append(float((sign * (x @ w["w"] + w["b"])).min() / torch.linalg.norm(w["w"])))
    assert margins[-1] > 0  # zero training errors
    assert margins[-1] > margins[5]
    assert sum(b >= a - 1e-6 for a, b in zip(margins[10:], margins[11:])) >= 0.8 * (len(margins) - 11)


def test_gns_on_a_quadratic_with_exact_hessian_is_damped_newton_and_decreases_f():
    a, b, f = _quadratic()
    fg = lambda x: (f(x), a @ x - b)  # noqa: E731
    x, gamma = torch.zeros(5, dtype=torch.float64), 1.0
    values = [float(f(x))]
    lams = []
    for _ in range(12):
        g = a @ x - b
        lam = float(torch.linalg.norm(g)) / (gamma + 1e-8)
        delta, new_gamma, ok, trials = gns_step(fg, x, g, a, gamma)
        if not ok:  # only at machine precision, where f(x) - f(x + delta) rounds to zero: no step, gamma kept
            assert float(torch.linalg.norm(g)) < 1e-12 and new_gamma == gamma and not delta.any()
        if trials == 1:  # accepted at once: exactly the damped Newton step with lambda = ||g|| / gamma
            torch.testing.assert_close(delta, -torch.linalg.solve(a + lam * torch.eye(5, dtype=torch.float64), g))
            assert new_gamma == 2 * gamma
            lams.append(lam)
        x, gamma = x + delta, new_gamma
        values.append(float(f(x)))
    assert all(v1 < v0 for v0, v1 in zip(values, values[1:]) if v0 - values[-1] > 1e-12)
    assert lams[-1] < 1e-3 * lams[0]  # lambda -> 0 as g -> 0: the step becomes Newton's
    torch.testing.assert_close(x, torch.linalg.solve(a, b))


def test_gns_gamma_halves_on_rejection_and_refuses_a_non_positive_definite_system():
    a, b, f = _quadratic(seed=1)
    fg = lambda x: (f(x), a @ x - b)  # noqa: E731
    x = torch.zeros(5, dtype=torch.float64)
    g = a @ x - b
    # a useless Hessian (zero) and a huge gamma: a giant gradient step, rejected until gamma is small
    delta, gamma, ok, trials = gns_step(fg, x, g, torch.zeros(5, 5, dtype=torch.float64), 1e6)
    assert ok and trials > 1 and gamma == 2 * 1e6 / 2 ** (trials - 1)
    assert float(f(x + delta)) < float(f(x))
    # -I + lambda I is not positive definite while lambda < 1: those trials count as rejections
    delta, gamma, ok, trials = gns_step(fg, x, g, -torch.eye(5, dtype=torch.float64), 1e3, max_tries=40)
    assert trials > 1 and (not ok or float(f(x + delta)) < float(f(x)))
    # no trial accepted: no step at all
    delta, gamma, ok, trials = gns_step(fg, x, g, -torch.eye(5, dtype=torch.float64), 1e9, max_tries=3)
    assert not ok and torch.equal(delta, torch.zeros(5, dtype=torch.float64)) and gamma == 1e9  # kept


def test_gns_transform_uses_the_closure_and_returns_minus_the_step():
    a, b, f = _quadratic(seed=2)
    t = GNSNewton()
    x = {"x": torch.zeros(5, dtype=torch.float64)}
    state = t.init(x)
    for _ in range(6):
        g = {"x": a @ x["x"] - b}
        d, state = t.update(g, state, x, loss_at=lambda p: f(p["x"]))
        x = {"x": x["x"] - 1.0 * d["x"]}
    torch.testing.assert_close(x["x"], torch.linalg.solve(a, b))
    m = t.metrics(state)
    assert m["accepted"] == 6 and m["rejected"] == 0 and m["gamma"] > 1.0


def test_dense_ggn_equals_the_hessian_of_a_linear_model_and_ggn_gns_steps_through_the_loop():
    from torch import nn

    from fedsim.clients.functional import batch_loss_fn
    from fedsim.clients.transforms_newton import _flat, _unflat, dense_ggn

    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(20, 4, generator=gen), torch.randint(0, 3, (20,), generator=gen)
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = list(params)
    f = batch_loss_fn(model, x, y)
    exact = torch.func.hessian(lambda v: f(_unflat(v, params, names)))(_flat(params, names))
    # softmax regression is linear in its parameters: the GGN is the exact Hessian
    torch.testing.assert_close(dense_ggn(model, x, y, nn.functional.cross_entropy, params, names), exact,
                               rtol=1e-4, atol=1e-6)
    t = GNSNewton(GNSNewton.Settings(hessian="ggn"))
    state, p = t.init(params), params
    start = float(f(p))
    for _ in range(3):
        with torch.enable_grad():
            q = {k: v.clone().requires_grad_(True) for k, v in p.items()}
            grads = dict(zip(q, torch.autograd.grad(f(q), list(q.values()))))
        d, state = t.update(grads, state, p, loss_at=f,
                            ggn_at=lambda pp, nn_: dense_ggn(model, x, y, nn.functional.cross_entropy, pp, nn_))
        p = {k: v - d[k] for k, v in p.items()}
    assert float(f(p)) < 0.5 * start and t.metrics(state)["accepted"] == 3
