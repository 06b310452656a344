"""A U-shaped headrest (cradle) touching the head is cut off the body (issue 10 point 4)."""

import cc3d
import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from faceaudit.petct.body import _ball, _core_voxels, _extruded_along_axis0, select_body_component

SPACING = (2.0, 2.0, 2.0)


def _head_in_cradle(*, cradle: bool = True, tilt_voxels: float = 0.0):
    """(z, y, x) head ellipsoid on a neck and a U-shaped cradle: an 8 mm elliptic shell round
    the back of the head whose inner wall is the head's widest outline (it touches the head
    around z = 50), open in front, its side arms reaching beside the cheeks (y >= 35, the head's
    front is y = 15), from below the chin (z 15) to above the ears (z 62). ``tilt_voxels``
    shifts the cradle along y by that much from its bottom to its top (a tilted headrest)."""
    z, y, x = np.mgrid[:80, :90, :90].astype(np.float32)
    head = ((z - 50) / 25.0) ** 2 + ((y - 45) / 30.0) ** 2 + ((x - 45) / 24.0) ** 2 <= 1.0
    neck = (((y - 50) / 10.0) ** 2 + ((x - 45) / 10.0) ** 2 <= 1.0) & (z < 35)
    body = head | neck
    if not cradle:
        return body, np.zeros_like(body)
    yc = y - tilt_voxels * (z - 15) / 47.0
    ring = np.sqrt(((yc - 45) / 30.0) ** 2 + ((x - 45) / 24.0) ** 2)
    shell = (ring >= 1.0) & (ring <= 1.0 + 4.0 / 24.0) & (yc >= 35) & (z >= 15) & (z < 62)
    return body, shell & ~body


@pytest.mark.parametrize("tilt_voxels", [0.0, 3.0])
def test_a_u_shaped_cradle_touching_the_head_is_cut_off_side_arms_and_all(tilt_voxels):
    body, cradle = _head_in_cradle(tilt_voxels=tilt_voxels)
    assert cc3d.connected_components(body | cradle, connectivity=26, return_N=True)[1] == 1
    chosen = select_body_component(body | cradle, SPACING)
    kept = chosen.mask & cradle
    contact = binary_dilation(body, np.ones((3, 3, 3), bool), iterations=2)
    # before: every cradle voxel stayed (its centroid is in front of the head's back)
    assert kept.sum() <= 0.05 * cradle.sum()
    assert not (kept & ~contact).any()               # only at the contact with the skull
    # the side arms beside the cheeks are gone entirely
    assert not (chosen.mask & cradle & (np.mgrid[:80, :90, :90][1] < 55)).any()
    # of the body, only skin voxels the cradle touches are lost (the hole under the contact)
    lost = body & ~chosen.mask
    assert not (lost & ~binary_dilation(cradle, np.ones((3, 3, 3), bool), iterations=2)).any()
    assert lost.sum() <= 0.005 * body.sum()


def test_a_head_without_cradle_is_left_as_it_is():
    body, _ = _head_in_cradle(cradle=False)
    assert select_body_component(body, SPACING).mask.sum() == body.sum()


def test_extrusion_measure_needs_a_long_sweep_of_one_cross_section():
    _, cradle = _head_in_cradle()
    z = np.flatnonzero(cradle.any(axis=(1, 2)))
    assert _extruded_along_axis0(cradle[z[0]: z[-1] + 1], SPACING)
    assert not _extruded_along_axis0(cradle[z[0]: z[0] + 10], SPACING)      # 20 mm: too short
    # a 4 mm skin layer of a skull dome (76 mm tall): thin, but its outline shrinks slice by
    # slice (median IoU 0.55)
    zz, yy, xx = np.mgrid[:19, :40, :40]
    radius = np.sqrt(zz ** 2 + (yy - 20) ** 2 + (xx - 20) ** 2)
    assert not _extruded_along_axis0((radius <= 18) & (radius > 16), (4.0, 2.0, 2.0))


def test_core_of_a_cube_is_the_cube_eroded_by_the_radius():
    cube = np.zeros((15, 15, 15), bool)
    cube[2:13, 2:13, 2:13] = True                    # 11 voxels a side, 1 mm
    # a voxel k voxels in from the face is k + 1 mm from the outside: deeper than 2 mm from k = 2
    assert _core_voxels(cube, (1.0, 1.0, 1.0), 2.0) == 7 ** 3
    assert _core_voxels(cube, (1.0, 1.0, 1.0), 5.5) == 1           # only the centre, 6 mm deep
    assert _core_voxels(cube[2:13, 2:13, 2:13], (1.0, 1.0, 1.0), 2.0) == 7 ** 3   # array border = outside
    assert _core_voxels(np.zeros((4, 4, 4), bool), (1.0, 1.0, 1.0), 2.0) == 0


@pytest.mark.parametrize("sampling", [(6.0, 6.12, 6.12), (8.0, 8.0, 8.0), (3.0, 2.04, 2.04), (1.0, 2.5, 4.0)])
@pytest.mark.parametrize("radius_mm", [4.0, 6.0, 8.7, 10.0, 12.0, 20.0])
def test_core_voxels_erosion_and_distance_transform_agree(sampling, radius_mm):
    from scipy.ndimage import distance_transform_edt, gaussian_filter

    rng = np.random.default_rng(int(radius_mm * 10) + int(sum(sampling) * 100))
    field = gaussian_filter(rng.random((40, 36, 32)), 3.0)
    blob = field > np.quantile(field, 0.4)
    expected = int(np.count_nonzero(distance_transform_edt(np.pad(blob, 1), sampling=sampling) > radius_mm))
    assert _core_voxels(blob, sampling, radius_mm) == expected
    ball = _ball(sampling, radius_mm)
    assert ball[tuple(n // 2 for n in ball.shape)]
