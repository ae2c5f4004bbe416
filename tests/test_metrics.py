import numpy as np
import pytest

from timevlm import metrics


def test_mse_mae_mape_by_hand():
    pred, true = np.array([1.0, 2.0, 4.0]), np.array([2.0, 2.0, 2.0])
    assert metrics.mse(pred, true) == pytest.approx((1 + 0 + 4) / 3)
    assert metrics.mae(pred, true) == pytest.approx((1 + 0 + 2) / 3)
    assert metrics.mape(pred, true) == pytest.approx(100 * (0.5 + 0 + 1) / 3)
    assert metrics.mape(np.array([1.0, 3.0]), np.array([0.0, 2.0])) == pytest.approx(50.0)  # zero truth skipped


def test_smape_by_hand():
    # |1-2|/(1+2) = 1/3, |3-3|/6 = 0, 0/0 counted as 0
    assert metrics.smape(np.array([1.0, 3.0, 0.0]), np.array([2.0, 3.0, 0.0])) == pytest.approx(200 * (1 / 3) / 3)


def test_mase_by_hand():
    insample = np.array([1.0, 2.0, 4.0, 7.0])  # lag-1 abs diffs 1, 2, 3 -> scale 2
    assert metrics.mase(np.array([8.0, 10.0]), np.array([9.0, 12.0]), insample, m=1) == pytest.approx(1.5 / 2)
    insample = np.array([1.0, 5.0, 2.0, 7.0])  # lag-2 diffs 1, 2 -> scale 1.5
    assert metrics.mase(np.array([0.0]), np.array([3.0]), insample, m=2) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="more than m=4"):
        metrics.mase(np.zeros(1), np.zeros(1), np.zeros(3), m=4)


def test_owa_by_hand():
    assert metrics.owa(10.0, 1.0, 20.0, 2.0) == pytest.approx(0.5)
    assert metrics.owa(13.0, 3.0, 13.0, 3.0) == pytest.approx(1.0)
