"""Training metrics: window means over the steps between log lines, not one step's value."""
import pytest

from ualm_jax.train.metrics import WindowMeans


def test_window_means_average_the_steps_since_the_last_line():
    w = WindowMeans()
    w.add({"loss": 2.0, "loss/text": 1.0, "lr": 0.1, "skipped": 0, "grad_norm": 4.0})
    w.add({"loss": float("nan"), "lr": 0.2, "skipped": 1, "grad_norm": float("inf")})  # skipped
    w.add({"loss": 4.0, "lr": 0.3, "skipped": 0, "grad_norm": 2.0})  # no text targets this step
    out = w.pop()
    assert out["loss"] == pytest.approx(3.0) and out["grad_norm"] == pytest.approx(3.0)
    assert out["loss/text"] == pytest.approx(1.0)  # over the steps that reported it
    assert out["lr"] == 0.3 and out["loss_last"] == 4.0 and out["window_steps"] == 3
    assert out["skipped"] == 1  # the non-finite values are out of the means, the step counted
    assert w.pop() == {"window_steps": 0, "skipped": 0}  # emptied
