"""Frontal render: known answers on a sphere, orientation invariance, a real face for MediaPipe."""

import numpy as np
import pytest
import SimpleITK as sitk
import trimesh

from faceaudit.core.contracts import RENDER_CROP
from faceaudit.core.images import center_crop
from faceaudit.petct.mesh import SurfaceMesh
from faceaudit.petct.render import LUMINANCE, render_frontal
from faceaudit.petct.surface import extract_head_surface
from faceaudit.petct.volumes import load_volume


def test_sphere_render_centre_background_and_depth():
    sphere = trimesh.creation.icosphere(subdivisions=5, radius=50.0)
    sphere.apply_translation([10.0, 200.0, -30.0])
    render = render_frontal(sphere, size=128, head_px=64)
    assert render.image.shape == (128, 128) and render.image.dtype == np.uint8
    assert render.image[0, 0] == 0 and np.isnan(render.depth[0, 0])       # black background
    centre = render.image[62:66, 62:66].astype(float)
    # the normal at the front of the sphere is the viewing axis (y): grey = 0.7154
    np.testing.assert_allclose(centre, 255 * LUMINANCE[1], atol=4)
    # the image plane sits 10 mm in front of the nearest point
    np.testing.assert_allclose(render.depth[62:66, 62:66], 10.0, atol=0.6)
    # 100 mm sphere over 64 px: its disc covers pi/4 of a 64 x 64 box
    np.testing.assert_allclose(render.hit.sum(), np.pi / 4 * 64 * 64, rtol=0.03)
    lambert = render_frontal(sphere, size=128, head_px=64, shading="lambert")
    assert lambert.image[62:66, 62:66].min() >= 250


def test_image_right_is_the_patients_left_and_up_is_superior():
    # a small cube on the patient's left (+x) and above (+z) a big one
    big = trimesh.creation.box(extents=[40, 40, 40])
    small = trimesh.creation.box(extents=[10, 10, 10])
    small.apply_translation([30, 0, 30])
    render = render_frontal(trimesh.util.concatenate([big, small]), size=100, head_px=80)
    rows, cols = np.nonzero(render.hit)
    top_rows = rows < rows.min() + 5
    assert cols[top_rows].mean() > 60                   # the small cube: top right of the image


def _write_oriented(array_zyx, path, permute=None, flip=None):
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing((3.2, 3.2, 1.5))
    if permute is not None:
        image = sitk.PermuteAxes(image, permute)
    if flip is not None:
        image = sitk.Flip(image, flip)
    sitk.WriteImage(image, str(path))


@pytest.mark.parametrize("permute, flip", [([0, 1, 2], [True, True, False]),
                                           ([2, 0, 1], [False, True, True]),
                                           ([1, 2, 0], [True, False, False])])
def test_same_head_stored_in_other_axis_orders_gives_the_same_render(tmp_path, headsq_ct_path,
                                                                     permute, flip):
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(headsq_ct_path)))
    _write_oriented(reference, tmp_path / "ref.nii.gz")
    _write_oriented(reference, tmp_path / "moved.nii.gz", permute=permute, flip=flip)
    renders = []
    for name in ("ref.nii.gz", "moved.nii.gz"):
        volume = load_volume(tmp_path / name)
        surface = extract_head_surface(volume.array, volume.spacing, modality="ct", origin=volume.origin)
        renders.append(render_frontal(surface.mesh))
    assert renders[0].hit.mean() > 0.05
    np.testing.assert_array_equal(renders[1].image, renders[0].image)


def test_shipped_real_ct_renders_a_face_mediapipe_reads(headsq_ct):
    from faceaudit.faces.facemesh import N_LANDMARKS, FaceMesh

    surface = extract_head_surface(headsq_ct.array, headsq_ct.spacing, modality="ct",
                                   origin=headsq_ct.origin)
    default = render_frontal(surface.mesh)                      # head inside the 208 centre crop
    close_up = render_frontal(surface.mesh, head_px=420)        # head filling the 512 image
    with FaceMesh() as mesh:
        on_crop = mesh.detect(center_crop(default.image, RENDER_CROP))
        on_full = mesh.detect(close_up.image)
    assert on_crop is not None and on_crop.shape == (N_LANDMARKS, 3)
    assert on_full is not None and on_full.shape == (N_LANDMARKS, 3)
    # the nose tip (landmark 1) lies near the horizontal centre of the face
    assert abs(on_full[1, 0] - 0.5) < 0.1


def _tilted_copy(image: sitk.Image, degrees: float) -> sitk.Image:
    """The same physical voxels on a grid whose direction cosines are pitched by ``degrees``
    about the patient's left-right axis (an oblique acquisition), covering the whole head."""
    from scipy.spatial.transform import Rotation

    rotation = Rotation.from_euler("x", degrees, degrees=True).as_matrix()
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(
        [(n - 1) / 2.0 for n in image.GetSize()]))
    size = [int(n * 1.25) for n in image.GetSize()]
    spacing = np.array(image.GetSpacing())
    origin = centre - rotation @ (np.array([(n - 1) / 2.0 for n in size]) * spacing)
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, tuple(origin),
                         tuple(spacing), tuple(rotation.ravel()), -1000.0, sitk.sitkFloat32)


def test_a_head_stored_with_oblique_direction_cosines_renders_upright(tmp_path):
    """Issue 10 point 3: a 10 degree oblique copy rendered pitched by 10 degrees; it is now
    resampled upright on reading (interpolated twice here, so equal up to a few pixels)."""
    from test_surface import _padded_head_ct

    from faceaudit.petct.reconstruction import ReconstructionOptions, reconstruct_volume

    upright = sitk.GetImageFromArray(_padded_head_ct(None))
    upright.SetSpacing((3.0, 3.0, 3.0))
    sitk.WriteImage(upright, str(tmp_path / "upright.nii.gz"))
    sitk.WriteImage(_tilted_copy(upright, 10.0), str(tmp_path / "oblique.nii.gz"))
    renders = []
    for name in ("upright.nii.gz", "oblique.nii.gz"):
        volume = load_volume(tmp_path / name)
        renders.append(reconstruct_volume(volume.array, volume.spacing, modality="ct",
                                          origin=volume.origin,
                                          options=ReconstructionOptions(head_height_mm=150.0)).render)
    (nose_row, nose_col), (tilted_row, tilted_col) = (
        np.unravel_index(np.nanargmin(r.depth), r.depth.shape) for r in renders)
    # read as stored, the tip sat 10 px higher and the grey levels differed by 0.80 on average
    assert abs(int(tilted_row) - int(nose_row)) <= 3 and abs(int(tilted_col) - int(nose_col)) <= 3
    assert np.abs(renders[0].image.astype(int) - renders[1].image).mean() < 0.65
    assert renders[1].camera["mm_per_px_at_face"] == pytest.approx(
        renders[0].camera["mm_per_px_at_face"], rel=0.015)


def test_rounding_noise_in_direction_cosines_keeps_the_copy_free_path(tmp_path, headsq_ct_path):
    """Headers carry float32 cosines: 1e-6 off an axis is not a tilt and is not resampled."""
    from faceaudit.petct.volumes import OBLIQUE_TOLERANCE, _obliqueness

    image = sitk.ReadImage(str(headsq_ct_path))
    image.SetDirection((1.0, 1e-6, 0.0, -1e-6, 1.0, 0.0, 0.0, 0.0, 1.0))
    assert _obliqueness(np.asarray(image.GetDirection()).reshape(3, 3)) < OBLIQUE_TOLERANCE
    sitk.WriteImage(image, str(tmp_path / "noisy.nii.gz"))
    noisy, clean = load_volume(tmp_path / "noisy.nii.gz"), load_volume(headsq_ct_path)
    np.testing.assert_array_equal(noisy.array, clean.array)
    assert noisy.spacing == clean.spacing


def test_renders_through_embree_directly_equal_those_through_trimesh():
    """first_hits conditions the scene as trimesh's Embree wrapper does: same hits, same pixels."""
    from trimesh.ray.ray_pyembree import RayMeshIntersector

    from faceaudit.petct.render import camera_rays, first_hits

    sphere = trimesh.creation.icosphere(subdivisions=4, radius=80.0)
    sphere.apply_translation([-30.0, 250.0, 1200.0])
    mesh = SurfaceMesh(vertices=sphere.vertices, faces=sphere.faces)
    for projection in ("orthographic", "pinhole"):
        origins, directions, _ = camera_rays(mesh.bounds, projection=projection)
        ours = first_hits(mesh, origins, directions)
        np.testing.assert_array_equal(ours, RayMeshIntersector(sphere).intersects_first(origins, directions))
        assert (ours >= 0).mean() > 0.05
    np.testing.assert_array_equal(render_frontal(mesh).image, render_frontal(sphere).image)
