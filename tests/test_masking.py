from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from faceaudit.core.files import InputError, read_npz, write_npz
from faceaudit.mask import backends, flame, topology
from faceaudit.mask import renderer as maskrender
from faceaudit.mask.headpose import estimate_pose, landmarks_to_viewer
from faceaudit.mask.selection import crop_face, upscale
from flame_fixtures import synthetic_flame_model

ORL = Path(__file__).resolve().parents[1] / "src" / "faceaudit" / "data" / "orl_faces"


@pytest.fixture(scope="module")
def renderer():
    r = maskrender.MaskRenderer(224, 224)
    yield r
    r.close()


@pytest.fixture(scope="module")
def face():
    """A 224x224 prep of ORL s1/1 and its MediaPipe landmarks."""
    from faceaudit.core.images import read_grey, to_uint8
    from faceaudit.faces.facedetect import make_detector
    from faceaudit.faces.facemesh import FaceMesh

    grey = upscale(np.repeat(to_uint8(read_grey(ORL / "s1" / "1.pgm"))[:, :, None], 3, 2), 3)
    box = make_detector("retinaface").detect(grey)[0].box
    prep = crop_face(grey, box)
    with FaceMesh() as mesh:
        lm = mesh.detect(prep)
    assert lm is not None
    return prep, lm


def test_triangulation_is_a_consistent_closed_face():
    tris, loops = topology.triangles_and_loops()
    assert len(tris) == 852  # Euler count of a disc with 3 holes over 468 points
    assert sorted(len(loop) for loop in loops) == [16, 16, 20, 36]  # eyes, lips, face oval
    faces = topology.face_triangles()
    assert len(faces) == 852 + 16 + 16 + 20 and faces.max() == topology.N_MESH_VERTICES - 1
    directed = Counter((int(a), int(b)) for f in faces for a, b in ((f[0], f[1]), (f[1], f[2]), (f[2], f[0])))
    assert max(directed.values()) == 1  # consistent winding: every edge once per direction
    undirected = Counter(tuple(sorted(e)) for e in directed)
    boundary = [e for e, n in undirected.items() if n == 1]
    assert len(boundary) == 36 and max(undirected.values()) == 2  # only the oval stays open


def test_render_places_a_square_where_its_pixels_are(renderer):
    verts = np.array([[50, 60, 0], [150, 60, 0], [150, 120, 0], [50, 120, 0]], float)
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    color, covered = renderer.render(verts, topology.orient_faces(verts, faces))
    rows, cols = np.nonzero(covered)
    assert abs(rows.min() - 60) <= 1 and abs(rows.max() - 119) <= 1
    assert abs(cols.min() - 50) <= 1 and abs(cols.max() - 149) <= 1
    assert np.all(color[~covered] == 255)
    inside = color[covered]
    assert np.all(inside[:, 0] == inside[:, 1]) and 40 < inside.mean() < 250  # grey, lit


@pytest.mark.parametrize("name", ["mediapipe", "meanshape"])
def test_mask_covers_the_face_and_nothing_outside_the_cut(face, renderer, name):
    prep, lm = face
    backend = backends.make_backend(name)
    result = backend.build(prep, lm)
    render, covered_render = renderer.render(result.vertices, result.faces)
    cut = maskrender.face_cut(lm, 224, 224)
    images = maskrender.compose(prep, render, covered_render, cut)
    covered = images.covered
    assert not np.any(covered & ~cut)
    assert covered.sum() / cut.sum() > 0.9  # forehead band included
    # the face itself (eyes, nose, mouth landmarks) lies under the mask
    px = np.round(lm[[33, 263, 1, 13, 199], :2] * 224).astype(int)
    assert covered[px[:, 1], px[:, 0]].all()
    assert np.array_equal(images.overlay[~covered], prep[~covered])
    assert np.all(images.mask_only[~covered] == 255) and np.all(images.mask_only_black[~covered] == 0)
    assert np.array_equal(images.overlay[covered], render[covered])
    assert not np.array_equal(images.overlay[covered], prep[covered])


def test_meanshape_keeps_pose_but_not_the_shape(face):
    prep, lm = face
    result = backends.make_backend("meanshape").build(prep, lm)
    own = topology.landmarks_to_image(lm, 224, 224)
    # back to MediaPipe's normalised convention to measure the mask's pose
    placed = np.stack([result.vertices[:478, 0] / 224, result.vertices[:478, 1] / 224,
                       -result.vertices[:478, 2] / 224], 1)
    p_mask, p_face = estimate_pose(placed, 224, 224), estimate_pose(lm, 224, 224)
    assert abs(p_mask.yaw - p_face.yaw) < 3 and abs(p_mask.pitch - p_face.pitch) < 3
    assert np.abs(result.vertices[:468] - own[:468]).max() > 2.0  # not the person's own mesh


def test_black_background_is_per_pixel_and_saturated_face_pixels_stay():
    prep = np.full((4, 4, 3), 90, np.uint8)
    render = np.full((4, 4, 3), 255, np.uint8)  # white canvas
    render[1:3, 1:3] = 255  # a saturated (white) face pixel block ...
    render[1, 1] = (255, 0, 0)  # ... and one with a single saturated channel
    covered = np.zeros((4, 4), bool)
    covered[1:3, 1:3] = True
    images = maskrender.compose(prep, render, covered, np.ones((4, 4), bool), min_coverage=0.2)
    assert np.all(images.mask_only_black[2, 2] == 255)  # saturated face pixel kept
    assert tuple(images.mask_only_black[1, 1]) == (255, 0, 0)
    assert np.all(images.mask_only_black[0] == 0)
    pic = np.array([[[255, 255, 255], [255, 0, 0], [255, 255, 254]]], np.uint8)
    out = maskrender.black_background(pic)
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 1].tolist() == [255, 0, 0]
    assert out[0, 2].tolist() == [255, 255, 254]


def test_too_small_a_mask_is_a_failure_not_an_unmasked_photo():
    cut = np.ones((10, 10), bool)
    covered = np.zeros((10, 10), bool)
    covered[:2] = True
    with pytest.raises(topology.MaskError, match="covers 20% of the face cut"):
        maskrender.compose(np.zeros((10, 10, 3), np.uint8), np.zeros((10, 10, 3), np.uint8), covered, cut)


def test_flame_missing_or_broken_model_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match=r"flame_model\.npz.*flame\.is\.tue\.mpg\.de"):
        flame.find_flame(tmp_path)
    with pytest.raises(InputError, match="--model_dir"):
        backends.make_backend("flame")
    write_npz(tmp_path / "flame_model.npz", v_template=np.zeros((3, 3)))
    with pytest.raises(InputError, match="lacks arrays"):
        flame.load_flame(tmp_path / "flame_model.npz")
    (tmp_path / "flame_model.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(InputError, match="cannot read"):
        flame.load_flame(tmp_path / "flame_model.npz")


@pytest.fixture(scope="module")
def flame_file(face, tmp_path_factory):
    _, lm = face
    mean = backends.derive_mean_shape([(lm, 224, 224)])  # one face is enough for a test model
    path = tmp_path_factory.mktemp("flame") / "flame_model.npz"
    write_npz(path, **synthetic_flame_model(mean, seed=3))
    return path


def test_flame_loader_reads_the_npz_form(flame_file):
    model = flame.load_flame(flame_file)
    raw = read_npz(flame_file)
    assert model.n_shape == 8 and model.n_expr == 4 and model.parents.tolist() == [-1, 0, 1, 1, 1]
    assert model.v_template.shape == (479, 3) and model.posedirs.shape == (479, 3, 36)
    assert np.array_equal(model.faces, raw["f"])


def test_flame_fit_recovers_a_posed_synthetic_face(flame_file):
    import torch

    model = flame.load_flame(flame_file)
    layer = flame.FlameLayer(model)
    rng = np.random.default_rng(7)
    shape = torch.tensor(rng.normal(scale=0.5, size=model.n_shape))
    expr = torch.tensor(rng.normal(scale=0.5, size=model.n_expr))
    pose = torch.zeros(5, 3, dtype=torch.float64)
    pose[0] = torch.tensor(np.radians([8.0, -12.0, 4.0]))  # global rotation (axis-angle)
    pose[2] = torch.tensor(np.radians([6.0, 0.0, 0.0]))    # jaw open a little
    verts = layer.vertices(shape, expr, pose).numpy()
    scale, shift = 600.0, np.array([112.0, -110.0, 0.0])
    view = scale * verts + shift
    lmk = np.einsum("lk,lkc->lc", model.lmk_b_coords, view[model.faces[model.lmk_face_idx]])
    target_img = np.stack([lmk[:, 0], -lmk[:, 1], lmk[:, 2]], 1)
    fit = flame.FlameBackend(model, iterations=300).fit(target_img)
    assert fit["rms_landmark_px"] < 0.5
    fitted = np.stack([fit["vertices_view"][:, 0], fit["vertices_view"][:, 1]], 1)
    assert np.abs(fitted - view[:, :2]).max() < 3.0  # whole mesh, not only the landmarks
    assert fit["scale"] == pytest.approx(scale, rel=0.05)


def test_flame_backend_masks_a_real_photo(face, renderer, flame_file):
    prep, lm = face
    backend = flame.FlameBackend(flame.load_flame(flame_file))
    result = backend.build(prep, lm)
    assert result.params["rms_landmark_px"] < 3.0
    render, covered = renderer.render(result.vertices, result.faces)
    images = maskrender.compose(prep, render, covered, maskrender.face_cut(lm, 224, 224))
    assert not np.any(images.covered & ~images.cut)


def test_unknown_backend_is_named():
    with pytest.raises(InputError, match="unknown masking backend 'dm'"):
        backends.make_backend("dm")


def test_viewer_and_image_geometry_agree(face):
    _, lm = face
    img = topology.landmarks_to_image(lm, 224, 224)
    view = landmarks_to_viewer(lm, 224, 224)
    assert np.allclose(img[:478, 0], view[:, 0]) and np.allclose(img[:478, 1], -view[:, 1])


def test_flame_indices_out_of_range_name_the_limits(flame_file, tmp_path):
    raw = read_npz(flame_file)
    raw["lmk_mediapipe_idx"] = raw["lmk_mediapipe_idx"].copy()
    raw["lmk_mediapipe_idx"][0] = 500
    write_npz(tmp_path / "flame_model.npz", **raw)
    with pytest.raises(InputError, match=r"lmk_mediapipe_idx < 478; found maxima .*, 500"):
        flame.load_flame(tmp_path / "flame_model.npz")
