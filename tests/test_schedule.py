import pytest

from lorafit.training.schedule import learning_rate, warmup_steps_for


def test_warmup_is_linear_up_to_peak():
    lrs = [learning_rate(s, 100, 1e-3, 10, 0.1) for s in range(10)]
    assert lrs == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])


def test_cosine_decays_monotonically_to_floor_at_last_step():
    lrs = [learning_rate(s, 100, 1e-3, 10, 0.1) for s in range(10, 100)]
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert learning_rate(55, 100, 1e-3, 10, 0.1) == pytest.approx((1e-3 + 1e-4) / 2, rel=0.02)


def test_no_warmup_starts_at_peak_and_single_step_run():
    assert learning_rate(0, 50, 2e-4, 0, 0.0) == pytest.approx(2e-4)
    assert learning_rate(0, 1, 2e-4, warmup_steps_for(1, -1), 0.1) == pytest.approx(2e-4)


def test_default_warmup_is_five_percent():
    assert warmup_steps_for(200, -1) == 10
    assert warmup_steps_for(200, 3) == 3
    assert warmup_steps_for(5, 50) == 5
