"""Learning-rate schedules, against values worked out by hand."""

import pytest

from workflow_scripts.schedules import cosine_warmup_decay, linear_warmup_decay


def test_linear_warmup_then_decay_by_hand():
    # 2 warm-up steps of 10: 1/2, 2/2, then (10 - s) / 8 down to 1/8 at the last step.
    expected = [0.5, 1.0, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8]
    assert [linear_warmup_decay(s, 10, 2) for s in range(10)] == expected
    assert [linear_warmup_decay(s, 4, 0) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]  # the tuned-lens library's


def test_cosine_warmup_then_decay_to_a_tenth():
    assert cosine_warmup_decay(0, 100, 10) == pytest.approx(0.1)
    assert cosine_warmup_decay(10, 100, 10) == pytest.approx(1.0)
    assert cosine_warmup_decay(55, 100, 10) == pytest.approx(0.55)  # half-way: the mean of 1 and 0.1
    assert cosine_warmup_decay(100, 100, 10) == pytest.approx(0.1)
