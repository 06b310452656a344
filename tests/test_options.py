import math

import pytest

from faceaudit.core.options import expect_choice, expect_number, expect_whole
from faceaudit.core.runner import OptionsError


@pytest.mark.parametrize("value, kwargs, ok", [
    (0.5, dict(low=0, high=1), True),
    (0, dict(low=0, high=1), True),
    (0, dict(low=0, high=1, low_open=True), False),
    (1, dict(low=0, high=1, high_open=True), False),
    (1.5, dict(low=0, high=1), False),
    (-3, dict(), True),
    (math.nan, dict(), False),
    (math.inf, dict(low=0), False),
    (True, dict(), False),
    ("1", dict(), False),
])
def test_expect_number_bounds(value, kwargs, ok):
    if ok:
        expect_number("--x", value, **kwargs)
    else:
        with pytest.raises(OptionsError, match=r"expected --x to be a number in"):
            expect_number("--x", value, **kwargs)


def test_messages_say_what_was_expected_and_found():
    with pytest.raises(OptionsError, match=r"expected --max_yaw to be a number in \[0, 90\], found -1"):
        expect_number("--max_yaw", -1, low=0, high=90)
    with pytest.raises(OptionsError, match=r"expected --n_boot to be a whole number >= 40, found 0"):
        expect_whole("--n_boot", 0, 40)
    with pytest.raises(OptionsError, match=r"expected --shading to be one of normals, lambert, found 'flat'"):
        expect_choice("--shading", "flat", ("normals", "lambert"))
    expect_whole("--jobs", 3, 1)
    with pytest.raises(OptionsError):
        expect_whole("--jobs", 2.0, 1)
