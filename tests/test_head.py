"""Finding the head in a body with the arms raised above it (issue 10 point 2)."""

import numpy as np
import pytest

from faceaudit.petct.head import find_head

CT_SPACING = (3.0, 3.2, 3.2)            # (z, y, x) mm


def _arms_up_ct(head_hu: np.ndarray | None = None, *, arms: bool = True,
                arm_offset_mm: float = 150.0, arm_top_mm: float = 290.0, hands: bool = True) -> np.ndarray:
    """Canonical (z, y, x) CT in HU of a patient with the arms raised, on a 3 x 3.2 x 3.2 mm
    grid: torso, neck, a head (the shipped head CT ``head_hu`` (47, 64, 64) at 3 mm slices,
    or an ellipsoid when None) with a dome on top, two upper-arm cylinders beside the head
    (axes ``arm_offset_mm`` from the midline, ending at ``arm_top_mm``) and, with ``hands``,
    the hands reaching over it (their top 120 mm above the head's). Head top: z = 201 mm
    (slice 117 of 160, z0 = -150 mm); hands' top: z = 321 mm (slice 157)."""
    nz, ny, nx = 160, 72, 132
    z = -150.0 + 3.0 * np.arange(nz)[:, None, None]
    y = 3.2 * np.arange(ny)[None, :, None]
    x = -110.0 + 3.2 * np.arange(nx)[None, None, :]
    cx, cy = 99.0, 105.0                                   # head centre (x, y) mm
    inside = np.zeros((nz, ny, nx), bool)
    ct = np.full((nz, ny, nx), -1000.0, np.float32)
    k0, x0 = 50, 34                                         # head z = 0 at slice 50, x = 0 at column 34
    if head_hu is not None:
        ct[k0: k0 + head_hu.shape[0], : head_hu.shape[1], x0: x0 + head_hu.shape[2]] = head_hu
        head_top_slice = ct[k0 + head_hu.shape[0] - 1] > -300
    else:
        head = ((z - 75.0) / 110.0) ** 2 + ((y - cy) / 90.0) ** 2 + ((x - cx) / 75.0) ** 2 <= 1.0
        nose = ((z - 70.0) / 20.0) ** 2 + ((y - 12.0) / 12.0) ** 2 + ((x - cx) / 10.0) ** 2 <= 1.0
        inside |= (head | nose) & (z <= 138.0)
        head_top_slice = inside[k0 + 46]
    # dome: the head's top slice shrunk towards its centre, 63 mm high
    rows, cols = np.nonzero(head_top_slice)
    for k in range(k0 + 47, k0 + 47 + 21):
        shrink = np.sqrt(max(1.0 - ((k - (k0 + 46)) * 3.0 / 66.0) ** 2, 0.0))
        centre_row, centre_col = cy / 3.2, (cx + 110.0) / 3.2
        keep = (np.round(centre_row + (rows - centre_row) * shrink).astype(int),
                np.round(centre_col + (cols - centre_col) * shrink).astype(int))
        inside[k][keep] = True
    neck = (((x - cx) / 50.0) ** 2 + ((y - 135.0) / 52.0) ** 2 <= 1.0) & (z <= 20.0) & (z > -60.0)
    torso = (((x - cx) / 150.0) ** 2 + ((y - 118.0) / 85.0) ** 2 <= 1.0) & (z <= -60.0)
    inside |= neck | torso
    if arms:
        for side in (-1.0, 1.0):
            arm_x = cx + side * arm_offset_mm
            inside |= ((x - arm_x) ** 2 + (y - 118.0) ** 2 <= 40.0 ** 2) & (z > -110.0) & (z <= arm_top_mm)
            if not hands:
                continue
            # the hand reaches over the head towards the midline, stopping 20 mm short of it
            inside |= ((np.abs(x - cx) >= 20.0) & (np.abs(x - cx) <= 190.0) & (side * (x - cx) > 0)
                       & ((y - 118.0) ** 2 <= 30.0 ** 2) & (z > 275.0) & (z <= 321.0))
    ct[inside & (ct < -300)] = 40.0
    return ct + np.random.default_rng(5).normal(0.0, 10.0, ct.shape).astype(np.float32)


ORIGIN = (-110.0, 0.0, -150.0)          # LPS (x, y, z) mm of voxel [0, 0, 0]
HEAD_TOP_MM, HANDS_TOP_MM = 201.0, 321.0


@pytest.fixture(scope="module")
def headsq_hu(headsq_ct):
    """The shipped head CT in HU at 3 mm slices (47, 64, 64)."""
    return np.asarray(headsq_ct.array[::2], dtype=np.float32) - 1024.0


def _top_mm(surface) -> float:
    return ORIGIN[2] + 3.0 * surface.crop[0].stop


def test_raised_arms_and_hands_above_the_head_are_not_the_head():
    """Issue 10 point 2: the crop started at the hands (321 mm) and ended at 70 mm, above the
    nose; the head's top is found as the top of what continues into the trunk via the neck."""
    from faceaudit.petct.surface import extract_head_surface

    surface = extract_head_surface(_arms_up_ct(), CT_SPACING, modality="ct", origin=ORIGIN)
    (x_lo, _, z_lo), (x_hi, _, z_hi) = surface.mesh.bounds
    assert abs(_top_mm(surface) - HEAD_TOP_MM) <= 6.0            # was the hands' top, 321 mm
    assert abs(z_hi - HEAD_TOP_MM) <= 6.0
    assert z_lo == pytest.approx(HEAD_TOP_MM - 240.0, abs=6.0)  # the chin and the neck are in
    # no arm in the mesh: the head is 150 mm wide, the arms' inner edges 110 mm from the midline
    assert 24.0 - 5.0 < x_lo and x_hi < 174.0 + 5.0
    # the same head without arms gives the same mesh
    alone = extract_head_surface(_arms_up_ct(arms=False), CT_SPACING, modality="ct", origin=ORIGIN)
    np.testing.assert_array_equal(surface.mesh.vertices, alone.mesh.vertices)


def test_arms_pressed_against_the_head_are_cut_off_where_they_touch_it():
    from faceaudit.petct.surface import extract_head_surface

    ct = _arms_up_ct(arm_offset_mm=112.0)            # arms overlap the head's sides by 3 mm
    surface = extract_head_surface(ct, CT_SPACING, modality="ct", origin=ORIGIN)
    (x_lo, _, _), (x_hi, _, z_hi) = surface.mesh.bounds
    assert abs(z_hi - HEAD_TOP_MM) <= 6.0
    # the head spans x 24..174 mm; the arms' outer sides are at x -53 and 251 mm
    assert 24.0 - 10.0 < x_lo and x_hi < 174.0 + 10.0


def test_find_head_keeps_a_tidy_body_as_it_is_and_leaves_out_the_arms():
    coarse = _arms_up_ct(arms=False)[::2, ::2, ::2] > -300
    region = find_head(coarse)
    assert region.mask is coarse and region.left_out_voxels == 0
    with_arms = _arms_up_ct()[::2, ::2, ::2] > -300
    region = find_head(with_arms)
    assert abs(region.top - 117 // 2) <= 1 and region.mask[: region.top + 1].any()
    assert not region.mask[region.top + 1:].any()
    # what is left out is the arms above the widest (torso) slice: lateral to the head
    left_out = with_arms & ~region.mask
    columns = np.nonzero(left_out)[2] * 6.4 - 110.0
    assert left_out.sum() == region.left_out_voxels > 0
    assert np.all(np.abs(columns - 99.0) >= 20.0 - 6.4)
    np.testing.assert_array_equal(region.mask & ~with_arms, False)


def test_shipped_head_with_raised_arms_renders_the_face_mediapipe_reads(headsq_hu):
    from faceaudit.core.contracts import RENDER_CROP
    from faceaudit.core.images import center_crop
    from faceaudit.faces.facemesh import FaceMesh
    from faceaudit.petct.reconstruction import reconstruct_volume
    from faceaudit.petct.render_qa import plausible_layout

    arms, alone = (reconstruct_volume(_arms_up_ct(headsq_hu, arms=a), CT_SPACING, modality="ct",
                                      origin=ORIGIN) for a in (True, False))
    # before: 132 mm of head from the forehead down, no face found on the 208 crop
    assert arms.numbers["head_height_mm"] == pytest.approx(240.0, abs=3.0)
    np.testing.assert_array_equal(arms.render.image, alone.render.image)
    with FaceMesh() as mesh:
        landmarks = mesh.detect(center_crop(arms.render.image, RENDER_CROP))
    assert landmarks is not None
    assert plausible_layout(landmarks)                   # eyes above nose above mouth above chin


def test_arms_beside_the_head_ending_below_its_top_are_left_out():
    """Review of stage 1: when the tracking reached the body's top slice (the head's) the
    whole body was returned, so arms split off on the way up but ending below the head's
    top stayed in the head mask and in the mesh."""
    from faceaudit.petct.surface import extract_head_surface

    # arms against the sides of the head (3 mm overlap), ending 51 mm below its top, no hands
    ct = _arms_up_ct(arm_offset_mm=112.0, arm_top_mm=150.0, hands=False)
    coarse = ct[::2, ::2, ::2] > -300
    region = find_head(coarse)
    assert region.mask is not coarse                      # was the body itself, arms and all
    assert abs(region.top - 117 // 2) <= 1
    left_out = coarse & ~region.mask
    assert left_out.sum() == region.left_out_voxels > 0
    columns = np.nonzero(left_out)[2] * 6.4 - 110.0
    assert np.all(np.abs(columns - 99.0) >= 20.0 - 6.4)       # only lateral pieces: the arms
    surface = extract_head_surface(ct, CT_SPACING, modality="ct", origin=ORIGIN)
    (x_lo, _, _), (x_hi, _, z_hi) = surface.mesh.bounds
    assert abs(z_hi - HEAD_TOP_MM) <= 6.0
    # before: x -54 .. 250 mm, the arms' outer sides; the head spans 24 .. 174 mm
    assert 24.0 - 10.0 < x_lo and x_hi < 174.0 + 10.0


@pytest.mark.parametrize("seed", range(6))
def test_split_of_whole_pieces_is_the_same_with_their_ids_or_labelled_again(seed):
    from scipy.ndimage import gaussian_filter, label

    from faceaudit.petct.head import _split

    rng = np.random.default_rng(seed)
    field = gaussian_filter(rng.random((60, 60)), 2.0)
    slice_ = field > np.quantile(field, 0.55)
    pieces, n = label(slice_, np.ones((3, 3), bool))
    assert n >= 3
    # some whole pieces, the ids shuffled: the split must not depend on how they are numbered
    kept = rng.permutation(np.arange(1, n + 1))[: max(2, n // 2)]
    renumbered = np.where(pieces > 0, rng.permutation(np.arange(1, n + 1))[pieces - 1], 0)
    to_head = np.isin(pieces, kept)
    for midline in (0.0, 30.0, 59.0):
        for min_share, min_voxels in ((0.25, 5.0), (0.0, 0.0), (0.6, 1.0)):
            expected = _split(to_head, midline, min_share, min_voxels)
            for ids in (pieces, renumbered):
                got = _split(to_head, midline, min_share, min_voxels, ids)
                np.testing.assert_array_equal(got[0], expected[0])
                np.testing.assert_array_equal(got[1], expected[1])
