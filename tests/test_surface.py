"""Surface extraction: analytic ellipsoid, body vs table, thresholds, head crop."""

import numpy as np
import pytest
from skimage.draw import ellipsoid, ellipsoid_stats

from faceaudit.stageio import InputError
from faceaudit.surface import (extract_head_surface, head_crop_slices, mask_to_mesh, pet_threshold,
                               ct_threshold, select_body_component)


@pytest.mark.parametrize("semi_axes, spacing", [((20, 25, 30), (1.0, 1.0, 1.0)),
                                                 ((30, 24, 18), (1.5, 2.0, 2.5))])
def test_ellipsoid_mesh_area_matches_the_analytic_area(semi_axes, spacing):
    a, b, c = semi_axes                       # mm along array axes 0, 1, 2
    mask = ellipsoid(a, b, c, spacing=spacing)
    _volume, area = ellipsoid_stats(a, b, c)
    mesh = mask_to_mesh(mask, spacing)        # 5 Laplacian iterations, volume kept
    assert mesh.is_watertight
    assert mesh.volume > 0                    # normals point outwards
    assert abs(mesh.area / area - 1.0) < 0.01
    # upstream-style smoothing (no volume constraint) shrinks a little but stays within 2 %
    upstream = mask_to_mesh(mask, spacing, volume_constraint=False)
    assert abs(upstream.area / area - 1.0) < 0.02
    # unsmoothed marching cubes on a binary mask overestimates (staircase): smoothing matters
    assert mask_to_mesh(mask, spacing, smoothing_iterations=0).area > 1.05 * area


def _body_and_big_table(shape=(60, 80, 90)):
    """Canonical (z, y, x) volume: an ellipsoidal body and a thin table with MORE voxels."""
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    body = (((z - 30) / 15.0) ** 2 + ((y - 30) / 12.0) ** 2 + ((x - 45) / 14.0) ** 2) <= 1.0
    table = (y >= 60) & (y < 63)                           # 3 voxels thick, the whole z and x
    return body, table


def test_body_is_kept_when_the_table_has_more_voxels():
    body, table = _body_and_big_table()
    assert table.sum() > body.sum()
    chosen = select_body_component(body | table, (2.0, 2.0, 2.0))
    np.testing.assert_array_equal(chosen.mask, body)
    assert len(chosen.candidates) == 2


def test_head_surface_of_a_ct_with_a_table_is_the_body():
    body, table = _body_and_big_table()
    ct = np.where(body, 40.0, -1000.0)
    ct[table] = 300.0
    ct += np.random.default_rng(0).normal(0, 10, ct.shape)
    surface = extract_head_surface(ct, (2.0, 2.0, 2.0), modality="ct", ct_threshold_method=-300)
    lo, hi = surface.mesh.bounds
    # body: y in 18..42 voxels -> 36..84 mm; the table (y 120..126 mm) is not in the mesh
    assert hi[1] < 90.0 and lo[1] > 30.0
    assert abs((hi[0] - lo[0]) - 56.0) < 5.0              # body width 2 x 14 voxels x 2 mm


def test_ct_otsu_lies_between_air_and_tissue():
    rng = np.random.default_rng(1)
    ct = np.where(rng.random((30, 30, 30)) < 0.3, 40.0, -1000.0) + rng.normal(0, 20, (30, 30, 30))
    level = ct_threshold(ct, method="otsu")
    assert -1000 + 3 * 20 < level < 40 - 3 * 20           # separates the two classes
    assert ct_threshold(ct, method="-300") == -300.0
    with pytest.raises(InputError, match="otsu"):
        ct_threshold(ct, method="bone")


def _pet_body(pad: int, lesion_suv: float = 0.0):
    """SUV 1.0 body in air, ``pad`` extra air voxels around (field of view), optional hot lesion."""
    rng = np.random.default_rng(2)
    z, y, x = np.mgrid[:40, :40, :40]
    body = (((z - 20) / 16.0) ** 2 + ((y - 20) / 14.0) ** 2 + ((x - 20) / 15.0) ** 2) <= 1.0
    suv = np.where(body, 1.0, 0.0) + np.abs(rng.normal(0, 0.03, body.shape))
    if lesion_suv:
        suv[(z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 <= 36] = lesion_suv
    return np.pad(suv, pad)


def test_adaptive_pet_threshold_ignores_field_of_view_and_tumour_burden():
    small, large, hot = _pet_body(0), _pet_body(30), _pet_body(0, lesion_suv=12.0)
    adaptive = [pet_threshold(v, method="adaptive") for v in (small, large, hot)]
    np.testing.assert_allclose(adaptive, 0.5, atol=0.03)   # half the tissue uptake: the skin edge
    percentile = [pet_threshold(v, method="percentile") for v in (small, large, hot)]
    # the upstream 95th percentile moves with the field of view: in the large FOV it falls in air
    assert percentile[1] < 0.2 < percentile[0]


def test_head_crop_takes_the_top_of_the_body_over_a_physical_height():
    body = np.zeros((100, 10, 10), bool)
    body[5:80, 2:8, 3:7] = True                            # top body slice = 79
    crop = head_crop_slices(body, (3.0, 2.0, 2.0), head_height_mm=60.0)
    assert (crop[0].start, crop[0].stop) == (60, 80)       # 20 slices x 3 mm
    assert (crop[1].start, crop[1].stop, crop[2].start, crop[2].stop) == (2, 8, 3, 7)


def test_empty_threshold_result_is_an_input_error():
    with pytest.raises(InputError, match="skin threshold"):
        select_body_component(np.zeros((5, 5, 5), bool), (1, 1, 1))


def test_components_are_26_connected():
    mask = np.zeros((20, 20, 20), bool)
    mask[2:8, 2:8, 2:8] = True
    mask[8:14, 8:14, 8:14] = True          # touches the first cube at one corner only
    chosen = select_body_component(mask, (1.0, 1.0, 1.0))
    assert chosen.n_components == 1 and chosen.mask.sum() == mask.sum()


def test_smoothing_keeps_a_far_away_mesh_in_place():
    from faceaudit.surface import laplacian_smooth

    mask = ellipsoid(10, 12, 14, spacing=(1.0, 1.0, 1.0))
    mesh = mask_to_mesh(mask, (1.0, 1.0, 1.0), offset_mm=(500.0, -300.0, 900.0),
                        smoothing_iterations=0)
    smoothed = laplacian_smooth(mesh.vertices, mesh.faces, iterations=5, keep_volume=True)
    # volume kept by scaling about the centroid: the centre does not drift towards the origin
    np.testing.assert_allclose(smoothed.mean(0), mesh.vertices.mean(0), atol=0.05)
    import trimesh

    assert trimesh.Trimesh(smoothed, mesh.faces).volume == pytest.approx(mesh.volume, rel=1e-6)
