"""Frontal render: known answers on a sphere, orientation invariance, a real face for MediaPipe."""

import numpy as np
import pytest
import SimpleITK as sitk
import trimesh

from faceaudit.core.images import center_crop
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
        on_crop = mesh.detect(center_crop(default.image, 208))
        on_full = mesh.detect(close_up.image)
    assert on_crop is not None and on_crop.shape == (N_LANDMARKS, 3)
    assert on_full is not None and on_full.shape == (N_LANDMARKS, 3)
    # the nose tip (landmark 1) lies near the horizontal centre of the face
    assert abs(on_full[1, 0] - 0.5) < 0.1
