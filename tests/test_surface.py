"""Surface extraction: analytic ellipsoid, body vs table, thresholds, head crop."""

import numpy as np
import pytest
from skimage.draw import ellipsoid, ellipsoid_stats

from faceaudit.core.files import InputError
from faceaudit.petct.body import select_body_component
from faceaudit.petct.mesh import SurfaceMesh
from faceaudit.petct.surface import (
    ct_threshold,
    extract_head_surface,
    head_crop_slices,
    mask_to_mesh,
    pet_threshold,
)


@pytest.mark.parametrize("semi_axes, spacing", [((20, 25, 30), (1.0, 1.0, 1.0)),
                                                 ((30, 24, 18), (1.5, 2.0, 2.5))])
def test_ellipsoid_mesh_area_matches_the_analytic_area(semi_axes, spacing):
    a, b, c = semi_axes                       # mm along array axes 0, 1, 2
    mask = ellipsoid(a, b, c, spacing=spacing)
    _volume, area = ellipsoid_stats(a, b, c)
    mesh = mask_to_mesh(mask, spacing)        # 5 Laplacian iterations, volume kept
    assert mesh.to_trimesh().is_watertight
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
    from faceaudit.petct.surface import laplacian_smooth

    mask = ellipsoid(10, 12, 14, spacing=(1.0, 1.0, 1.0))
    mesh = mask_to_mesh(mask, (1.0, 1.0, 1.0), offset_mm=(500.0, -300.0, 900.0),
                        smoothing_iterations=0)
    smoothed = laplacian_smooth(mesh.vertices, mesh.faces, iterations=5, keep_volume=True)
    # volume kept by scaling about the centroid: the centre does not drift towards the origin
    np.testing.assert_allclose(smoothed.mean(0), mesh.vertices.mean(0), atol=0.05)
    import trimesh

    assert trimesh.Trimesh(smoothed, mesh.faces).volume == pytest.approx(mesh.volume, rel=1e-6)


# --------------------------------------------------------------------------- touching table

def _body_on_table(table_top: int, *, thickness: int = 3, shape=(60, 80, 90), ear: bool = False):
    """The ellipsoid body of _body_and_big_table (lowest voxel row y = 42) and a table slab
    starting at row ``table_top``: 43 touches the body at one voxel (26-connected), 42 at a
    contact patch ~11 voxels across. The table (slab minus body) has more voxels than the body.
    ``ear``: a thin plate (2 voxels) stuck to the body's side, a protrusion the erosion removes."""
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    body = (((z - 30) / 15.0) ** 2 + ((y - 30) / 12.0) ** 2 + ((x - 45) / 14.0) ** 2) <= 1.0
    if ear:
        body |= (z >= 26) & (z < 34) & (y >= 26) & (y < 32) & (x >= 58) & (x < 60)
    table = (y >= table_top) & (y < table_top + thickness) & ~body
    return body, table


def _within_one_voxel(mask):
    from scipy.ndimage import binary_dilation

    return binary_dilation(mask, np.ones((3, 3, 3), bool))


@pytest.mark.parametrize("table_top, thickness", [(43, 3), (42, 3), (43, 5), (42, 5), (42, 2)])
def test_a_table_touching_the_body_is_cut_off(table_top, thickness):
    import cc3d

    body, table = _body_on_table(table_top, thickness=thickness)
    assert table.sum() > body.sum()
    assert cc3d.connected_components(body | table, connectivity=26, return_N=True)[1] == 1
    chosen = select_body_component(body | table, (2.0, 2.0, 2.0))
    # none of the table, not even at the contact (the hole under the patch is filled too)
    assert not (chosen.mask & table).any()
    # all of the body but the voxels at the contact (within one voxel of the table)
    lost = body & ~chosen.mask
    assert not (lost & ~_within_one_voxel(table)).any()
    assert lost.sum() <= 0.002 * body.sum()
    assert chosen.table_voxels_removed == int(table.sum() + lost.sum())
    # upstream-style (opening off): the table stays in
    plain = select_body_component(body | table, (2.0, 2.0, 2.0), opening_radius_mm=0)
    np.testing.assert_array_equal(plain.mask, body | table)


def test_a_body_touching_nothing_is_exactly_the_old_selection():
    body, _ = _body_on_table(80, ear=True)               # no table in the volume
    far_body, far_table = _body_and_big_table()         # a table that does not touch
    for mask in (body, far_body | far_table):
        new = select_body_component(mask, (2.0, 2.0, 2.0))
        old = select_body_component(mask, (2.0, 2.0, 2.0), opening_radius_mm=0)
        np.testing.assert_array_equal(new.mask, old.mask)
        assert new.table_voxels_removed == 0
    # the thin ear is a residue of the opening but no table candidate: the body is unchanged
    np.testing.assert_array_equal(select_body_component(body, (2.0, 2.0, 2.0)).mask, body)


def test_a_big_protrusion_in_front_of_the_body_is_never_cut():
    """A residue piece as big as a table but anterior (a face-side structure) is left alone:
    only a piece behind the body's core can be a table."""
    body, slab = _body_on_table(16, thickness=3)          # 'table' rows 16..18, in front (y < 30)
    slab &= ~body
    mask = body | slab
    np.testing.assert_array_equal(select_body_component(mask, (2.0, 2.0, 2.0)).mask, mask)


def _ct_of(body, table):
    ct = np.where(body, 40.0, -1000.0)
    ct[table] = 300.0
    return ct + np.random.default_rng(0).normal(0, 10, ct.shape)


@pytest.mark.parametrize("thickness", [3, 5])              # 6 and 10 mm
def test_head_surface_with_a_touching_table_is_the_body_alone(thickness):
    body, table = _body_on_table(42, thickness=thickness)
    with_table = extract_head_surface(_ct_of(body, table), (2.0, 2.0, 2.0), modality="ct",
                                      ct_threshold_method=-300)
    alone = extract_head_surface(_ct_of(body, np.zeros_like(table)), (2.0, 2.0, 2.0),
                                 modality="ct", ct_threshold_method=-300)
    lo, hi = with_table.mesh.bounds
    lo_alone, hi_alone = alone.mesh.bounds
    # the table (y >= 84 mm, x 0..180 mm) is neither in the mesh nor in the framing extent
    np.testing.assert_allclose(lo, lo_alone, atol=1.0)
    np.testing.assert_allclose(hi, hi_alone, atol=2.5)   # the contact voxel row: <= 1 voxel
    assert hi[1] < 86.0
    assert abs(with_table.mesh.area / alone.mesh.area - 1.0) < 0.02
    # upstream-style: the table is in the mesh, several times wider than the body
    plain = extract_head_surface(_ct_of(body, table), (2.0, 2.0, 2.0), modality="ct",
                                 ct_threshold_method=-300, opening_radius_mm=0)
    assert plain.mesh.bounds[1][0] - plain.mesh.bounds[0][0] > 2 * (hi_alone[0] - lo_alone[0])


def test_head_surface_of_a_body_touching_nothing_is_unchanged():
    body, table = _body_and_big_table()
    ct = _ct_of(body, table)
    new = extract_head_surface(ct, (2.0, 2.0, 2.0), modality="ct", ct_threshold_method=-300)
    old = extract_head_surface(ct, (2.0, 2.0, 2.0), modality="ct", ct_threshold_method=-300,
                               opening_radius_mm=0)
    np.testing.assert_array_equal(new.mesh.vertices, old.mesh.vertices)
    np.testing.assert_array_equal(new.mesh.faces, old.mesh.faces)
    assert new.crop == old.crop


def test_table_hole_filling_is_along_axis_0_and_bounded():
    from faceaudit.petct.body import _fill_gaps_axis0

    column = np.zeros((12, 2, 1), bool)
    column[[1, 5, 11], 0, 0] = True                       # gaps of 3 (2..4) and 5 (6..10) voxels
    column[3, 1, 0] = True                                # a lone voxel: nothing to fill
    np.testing.assert_array_equal(np.flatnonzero(_fill_gaps_axis0(column, 3)[:, 0, 0]), [2, 3, 4])
    filled = _fill_gaps_axis0(column, 5)[:, 0, 0]
    np.testing.assert_array_equal(np.flatnonzero(filled), [2, 3, 4, 6, 7, 8, 9, 10])
    assert not _fill_gaps_axis0(column, 5)[:, 1, 0].any()


def _tidy_demo_study(folder) -> dict:
    """modality -> NIfTI path of the first simulated demo study, without any hard case
    (the generator's API before and after it learnt the hard cases of issue 10)."""
    import inspect

    from faceaudit.demo import cohort as demo_data

    with_cases = "hard_cases" in inspect.signature(demo_data.plan_cohort).parameters
    entry = demo_data.plan_cohort(n=1, seed=0, **({"hard_cases": ()} if with_cases else {}))[0]
    rng = np.random.default_rng(entry["noise_seed"])
    anatomy = demo_data.warp_anatomy(entry["identity"], entry["pose"])
    if isinstance(anatomy, tuple):
        (hu, brain, world_y), grid = anatomy, demo_data.output_grid_origin()
    else:
        hu, brain, world_y, grid = anatomy.hu, anatomy.brain, anatomy.world_y, anatomy.grid
    volumes = {"ct": demo_data.simulate_ct(hu, world_y, rng),
               "pet": demo_data.simulate_pet(hu, brain, entry["identity"], rng)}
    paths = {}
    for modality, array in volumes.items():
        paths[modality] = folder / f"{modality}.nii.gz"
        demo_data._write_nifti(paths[modality], array, grid)
    return paths


def test_simulated_demo_study_renders_are_identical_with_and_without_the_table_cut(tmp_path,
                                                                                  monkeypatch):
    """The demo cohort's table does not touch the body: the cut must change no pixel of
    either render (it once cut holes through the faces of this cohort). Nothing is above its
    heads either: the head finder hands the body back as it is (renders unchanged)."""
    import faceaudit.petct.surface as surface_module
    from faceaudit.petct.head import find_head

    regions = []

    def spy(mask, **kwargs):
        regions.append((mask, find_head(mask, **kwargs)))
        return regions[-1][1]

    monkeypatch.setattr(surface_module, "find_head", spy)
    from faceaudit.petct.reconstruction import ReconstructionOptions, reconstruct_volume
    from faceaudit.petct.volumes import load_volume

    for modality, path in _tidy_demo_study(tmp_path).items():
        volume = load_volume(path)
        renders = [reconstruct_volume(volume.array, volume.spacing, modality=modality,
                                      origin=volume.origin,
                                      options=ReconstructionOptions(opening_radius_mm=radius)
                                      ).render.image for radius in (6.0, 0.0)]
        assert renders[0].shape == (512, 512) and renders[0].any()
        np.testing.assert_array_equal(renders[0], renders[1])
    assert len(regions) >= 4 and all(region.mask is mask for mask, region in regions)


def _padded_head_ct(padding: float | None) -> np.ndarray:
    """A head-on-neck CT (HU, 15 HU noise) whose voxels outside the in-plane reconstruction
    circle hold the scanner's ``padding`` value (None: no padding, air there)."""
    rng = np.random.default_rng(11)
    z, y, x = np.mgrid[:48, :56, :56].astype(np.float32)
    head = ((z - 32) / 13.0) ** 2 + ((y - 26) / 12.0) ** 2 + ((x - 28) / 10.0) ** 2 <= 1.0
    nose = ((z - 31) / 3.0) ** 2 + ((y - 13) / 3.0) ** 2 + ((x - 28) / 2.0) ** 2 <= 1.0
    neck = (((y - 28) / 7.0) ** 2 + ((x - 28) / 7.0) ** 2 <= 1.0) & (z < 24)
    ct = np.where(head | nose | neck, 40.0, -1000.0) + rng.normal(0, 15, z.shape)
    ct = np.clip(np.rint(ct), -1024, 3071).astype(np.float32)
    if padding is not None:
        ct[(y - 27.5) ** 2 + (x - 27.5) ** 2 > 27.5 ** 2] = padding
    return ct


@pytest.mark.parametrize("padding", [-3024.0, -2048.0, -1024.0])
def test_scanner_padding_outside_the_reconstruction_circle_does_not_move_the_skin(padding):
    """Issue 10 point 1: with -3024 HU padding Otsu landed at about -3017 HU, the body mask was
    the whole circle and the render a flat grey band, status ok."""
    from faceaudit.petct.reconstruction import ReconstructionOptions, reconstruct_volume

    options = ReconstructionOptions(head_height_mm=150.0)
    clean, padded = (reconstruct_volume(_padded_head_ct(p), (3.0, 3.0, 3.0), modality="ct",
                                        options=options) for p in (None, padding))
    assert -1000.0 + 3 * 15 < padded.numbers["threshold"] < 40.0 - 3 * 15     # air | tissue
    assert padded.numbers["head_voxels"] == clean.numbers["head_voxels"]
    np.testing.assert_array_equal(padded.render.image, clean.render.image)
    assert padded.numbers["head_width_mm"] == pytest.approx(60.0, abs=6.0)   # 2 x 10 voxels x 3 mm


def test_otsu_falls_back_to_the_whole_sample_when_everything_is_below_the_scanner_range():
    values = np.where(np.arange(1000) % 2 == 0, -3000.0, -2000.0)
    assert -3000.0 < ct_threshold(values, method="otsu") < -2000.0


def test_surface_mesh_numbers_match_trimesh_and_its_ply_reads_back():
    """SurfaceMesh's bounds, normals, area and volume are trimesh's, and trimesh reads its PLY."""
    import io

    import trimesh

    sphere = trimesh.creation.icosphere(subdivisions=3, radius=40.0)
    sphere.apply_translation([-120.0, 300.0, 900.0])           # far from the origin, as in LPS
    mesh = SurfaceMesh(vertices=sphere.vertices, faces=sphere.faces)
    np.testing.assert_array_equal(mesh.bounds, sphere.bounds)
    np.testing.assert_allclose(mesh.face_normals, sphere.face_normals, atol=1e-12)
    assert mesh.area == pytest.approx(sphere.area, rel=1e-12)
    assert mesh.volume == pytest.approx(sphere.volume, rel=1e-9) and mesh.volume > 0
    back = trimesh.load(io.BytesIO(mesh.ply_bytes()), file_type="ply", process=False)
    np.testing.assert_allclose(back.vertices, sphere.vertices, atol=1e-4)        # float32 on disk
    np.testing.assert_array_equal(back.faces, sphere.faces)
    flat = SurfaceMesh(vertices=[[0, 0, 0], [1, 0, 0], [2, 0, 0]], faces=[[0, 1, 2]])
    np.testing.assert_array_equal(flat.face_normals, [[0.0, 0.0, 0.0]])      # degenerate: no normal
