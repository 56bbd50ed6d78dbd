"""pml_plugins.validation's scalar checks: boundaries, types, messages, and the plugins that use them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pml_plugins import validation as v


@pytest.mark.parametrize(
    "check, good, bad_values, bad_types",
    [
        (v.check_positive_int, [1, 7, np.int64(3)], [0, -2], [True, 1.0, "3", None]),
        (v.check_non_negative_int, [0, 5], [-1], [False, 0.0]),
        (v.check_positive_float, [1e-9, 3, 2.5, np.float32(0.5)], [0, -1.0, math.inf, math.nan], [True, "1", None]),
        (v.check_non_negative_float, [0, 0.0, 4.0], [-1e-9, math.nan], [False]),
        (v.check_finite_float, [-3.5, 0, 1e30], [math.inf, -math.inf, math.nan], [None, [1.0]]),
        (v.check_probability, [0, 0.5, 1], [-0.1, 1.1, math.nan], ["0.5"]),
    ],
)
def test_scalar_checks_accept_convert_and_refuse(check, good, bad_values, bad_types):
    for value in good:
        out = check("x", value)
        assert out == value and type(out) is (int if "int" in check.__name__ else float)
    for value in bad_values:
        with pytest.raises(ValueError, match=r"^x must be .*, got "):
            check("x", value)
    for value in bad_types:
        with pytest.raises(v.ArgumentTypeError, match=r"^x must be .*, got ") as info:
            check("x", value)
        assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)


def test_messages_name_the_argument_and_the_range():
    with pytest.raises(ValueError, match=r"^num_classes must be a positive integer, got 0$"):
        v.check_positive_int("num_classes", 0)
    with pytest.raises(ValueError, match=r"^every_epochs must be a positive integer or None, got 0$"):
        v.check_positive_int("every_epochs", 0, allow_none=True)
    assert v.check_positive_int("every_epochs", None, allow_none=True) is None
    with pytest.raises(ValueError, match=r"^margin must be a finite number > 0 \(m of eq. 2\), got 0$"):
        v.check_positive_float("margin", 0, note="m of eq. 2")
    with pytest.raises(ValueError, match=r"^n must be an integer in \[2, 4\], got 5$"):
        v.check_int("n", 5, minimum=2, maximum=4)
    with pytest.raises(ValueError, match=r"^t must be a finite number in \(0, 1\), got 1$"):
        v.check_float("t", 1, minimum=0, maximum=1, min_inclusive=False, max_inclusive=False)
    with pytest.raises(ValueError, match=r"^mode must be one of \('a', 'b'\), got 'c'$"):
        v.check_choice("mode", "c", ("a", "b"))
    assert v.check_choice("mode", "a", ("a", "b")) == "a"


def test_the_plugins_use_the_shared_checks():
    # the same message from every plugin constructor (they used to carry their own copies)
    from pml_plugin_cam import ClassAnchorMarginLoss
    from pml_plugin_dmcac import DMCACLoss
    from pml_plugin_group_loss import GroupLoss
    from pml_plugin_mpa import MultiProxyAnchorLoss

    for make in (
        lambda: ClassAnchorMarginLoss(num_classes=0, embedding_size=4),
        lambda: MultiProxyAnchorLoss(num_classes=0, embedding_size=4),
        lambda: DMCACLoss(num_classes=0, embedding_size=4),
        lambda: GroupLoss(num_classes=0, embedding_size=4),
    ):
        with pytest.raises(ValueError, match="^num_classes must be a positive integer, got 0$"):
            make()
    with pytest.raises(ValueError, match=r"gamma must be a finite number > 0 \(softmax temperature of eq. 1\)"):
        MultiProxyAnchorLoss(num_classes=2, embedding_size=4, gamma=0)
    with pytest.raises(ValueError, match="num_anchors must be an integer >= 0, got -1"):
        GroupLoss(num_classes=2, embedding_size=4, num_anchors=-1)
