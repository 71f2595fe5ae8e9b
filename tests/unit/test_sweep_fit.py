"""The mixture sweep's maths and plan: fits recover known laws, leave-one-out error is honest, the
best blend stays inside the sampled range, bad blends files and objectives are named."""
import numpy as np
import pytest

from ualm_jax.recipes import sweep_fit
from ualm_jax.recipes.mixture_sweep import load_blends, sample_blends

NAMES = ["a", "b", "c"]


def simplex(n, seed=0):
    return np.random.default_rng(seed).dirichlet(np.ones(3), n)


def test_a_power_law_in_the_own_share_is_recovered_and_zero_shares_are_left_out():
    x = simplex(8)
    x[0] = [0.0, 0.5, 0.5]  # task a never seen: not on its data-amount law
    y = np.concatenate([[7.0], 0.8 * x[1:, 0] ** -0.3])
    f = sweep_fit.fit_task("a", x, y, "loglinear", column=0)
    np.testing.assert_allclose(f.coef, [np.log(0.8), -0.3], atol=1e-4)
    assert f.used.tolist() == [False] + [True] * 7 and np.isnan(f.loo_pred[0])
    assert f.r2 == pytest.approx(1.0) and f.loo_rmse < 1e-4
    new = simplex(5, seed=1)
    np.testing.assert_allclose(f.predict(new), 0.8 * new[:, 0] ** -0.3, rtol=1e-4)


def test_a_linear_law_is_recovered_exactly():
    x = simplex(8)
    coef = np.array([0.5, 1.5, 2.0])
    f = sweep_fit.fit_task("a", x, x @ coef, "linear")
    np.testing.assert_allclose(f.coef, coef, atol=1e-4)
    assert f.r2 == pytest.approx(1.0) and f.loo_rmse < 1e-4


def test_leave_one_out_error_sees_noise_the_in_sample_fit_hides():
    x = simplex(5)
    y = 1.2 * x[:, 0] ** -0.4 + np.random.default_rng(3).normal(0, 0.05, 5)
    f = sweep_fit.fit_task("a", x, y)
    in_sample = np.sqrt(((f.predict(x) - y) ** 2).mean())
    assert f.loo_rmse > in_sample > 0
    # Each leave-one-out prediction is the fit on the other four blends.
    keep = np.arange(5) != 2
    alone = sweep_fit.fit_task("a", x[keep], y[keep])
    assert f.loo_pred[2] == pytest.approx(float(alone.predict(x[2:3])[0]))


def test_best_blend_minimises_inside_the_sampled_range():
    x = np.array([[0.6, 0.2, 0.2], [0.2, 0.6, 0.2], [0.2, 0.2, 0.6], [0.4, 0.3, 0.3],
                  [0.3, 0.4, 0.3], [0.34, 0.33, 0.33], [0.5, 0.5, 0.0]])
    # Task a's loss falls faster with its share than b's; c's loss never changes.
    losses = {"a": list(x[:, 0] ** -0.6), "b": list(x[:, 1] ** -0.2),
              "c": [3.0] * 7}
    f = sweep_fit.fit_sweep(NAMES, x, losses, objective="a=1,b=1")
    assert f.weights == {"a": 0.5, "b": 0.5, "c": 0.0}
    best, value, per_task = sweep_fit.best_blend(f, x, candidates=5000)
    assert (best <= x.max(0) + 1e-9).all() and (best >= 0.2 - 1e-9).all()  # smallest positive
    assert best[2] == pytest.approx(0.2, abs=0.02)  # c's share buys nothing
    assert best[0] > best[1]  # a's loss falls faster with its share
    assert value == pytest.approx(0.5 * per_task["a"] + 0.5 * per_task["b"])
    assert value <= f.objective(x[:-1]).min() + 1e-9  # the last blend lies outside (c = 0)


def test_tasks_without_held_out_loss_or_enough_data_are_left_out_and_named():
    x = simplex(4)
    f = sweep_fit.fit_sweep(NAMES, x, {"a": [1.0, 2.0, 1.5, 1.2], "b": [1, None, 1, 1]})
    assert list(f.fits) == ["a"] and f.weights == {"a": 1.0}
    x[:2, 2] = 0.0
    x /= x.sum(1, keepdims=True)
    f = sweep_fit.fit_sweep(NAMES, x, {t: [1.0, 2.0, 1.5, 1.2] for t in NAMES}, objective="a=1,c=1")
    assert list(f.fits) == ["a", "b"] and f.weights == {"a": 1.0, "b": 0.0}
    assert "task 'c': 2 blends with a held-out loss and a share > 0" in f.skipped["c"]


@pytest.mark.parametrize("spec,msg", [("a=1,z=2", "tasks from a, b, c"), ("a=x", "not a number"),
                                      ("a=-1", "must be >= 0"), ("a=0", "at least one weight"),
                                      ("a", "expected mean or task=weight")])
def test_bad_objectives_are_named(spec, msg):
    with pytest.raises(ValueError, match=msg):
        sweep_fit.objective_weights(spec, NAMES)


def test_blends_files_are_checked_and_renormalised(tmp_path):
    good = tmp_path / "b.yaml"
    good.write_text("blends:\n  - {name: x, shares: {a: 2, b: 2}}\n  - {a: 1, c: 3}\n")
    blends = load_blends(str(good), NAMES)
    assert blends == [{"name": "x", "shares": {"a": 0.5, "b": 0.5, "c": 0.0}},
                      {"name": "b01", "shares": {"a": 0.25, "b": 0.0, "c": 0.75}}]
    for text, msg in (("blends:\n  - {a: 1, zz: 1}\n", r"blends\[0\].shares: unknown task\(s\) zz"),
                      ("blends:\n  - {a: -1, b: 1}\n", r"shares.a=-1: expected a share >= 0"),
                      ("blends:\n  - {a: 0}\n", "every share is 0"),
                      ("blends:\n  - {name: q, a: 1}\n  - {name: q, b: 1}\n", "unique name"),
                      ("blends: []\n", "non-empty list")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ValueError, match=msg):
            load_blends(str(bad), NAMES)


def test_sampled_blends_centre_on_the_config_and_repeat_with_the_seed():
    base = {"a": 0.5, "b": 0.3, "c": 0.2}
    one, two = sample_blends(base, 200, 7, 50.0), sample_blends(base, 200, 7, 50.0)
    assert one == two and one[0] == {"name": "base", "shares": base}
    mean = np.mean([[b["shares"][n] for n in NAMES] for b in one[1:]], axis=0)
    np.testing.assert_allclose(mean, [0.5, 0.3, 0.2], atol=0.02)
    assert sample_blends(base, 3, 8, 50.0) != sample_blends(base, 3, 7, 50.0)
