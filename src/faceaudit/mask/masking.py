"""Digital-mask backends behind one interface, the mask renderer and the face cut.

A backend turns a 224x224 prep image and its MediaPipe landmarks into a 3D face
mesh in *image geometry*: vertex columns are (x = image column px, y = image row
px, depth px towards the viewer). The renderer draws that mesh as an untextured
grey surface (albedo 0.65, three point lights as the upstream OpenDR renderer)
with an orthographic camera covering exactly the image, so the mask sits where
the face is. The result is cut to the face region: the convex hull of
MediaPipe's face-oval landmarks, its upper part pushed up to take in the
forehead (upstream used the hull of dlib's 81 points, forehead included).

Backends
--------
``mediapipe``  the 478-point face mesh found on the prep image. Triangles are the
    3-cliques of MediaPipe's FACEMESH_TESSELATION edge graph (854), minus the two
    cliques that are not faces (their three edges already border two faces each;
    852 left, the Euler count for a disc with three holes), plus fans that close
    the holes: each eye to its iris centre (landmarks 468/473), the mouth to an
    added vertex at the inner-lip centroid, so no eye or mouth of the photo shows
    through. Windings are made consistent over the mesh (trimesh), then flipped
    so the face looks at the viewer.
``meanshape``  the same topology with the identity replaced by a population mean
    shape, aligned to the detected landmarks by a similarity transform (rotation,
    scale, translation): only the pose is kept (the expression is the mean's). The
    default mean comes from the 400 ORL photos shipped with the package (40 people,
    see :func:`derive_mean_shape`); when masking those same people each contributes
    1/40 of it. A mean of another population can be given as ``meanshape.npz``
    (array ``mean_shape`` (478, 3)) in ``--model_dir``.
Both MediaPipe-topology meshes get a forehead band (:func:`add_forehead`) so the
mask fills the face cut.
``flame``  a user-supplied FLAME model in ``.npz`` form (see :func:`load_flame`),
    shape/expression/pose/camera fitted to the detected landmarks in torch.

An image whose mask cannot be built raises :class:`MaskError`; callers record it
as failed and never pass the photo on unmasked.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from faceaudit.mask.headpose import (REFERENCE_SHAPE, STABLE_POINTS, landmarks_to_viewer,
                                similarity_fit)
from faceaudit.core.files import InputError, read_npz

BACKENDS = ("mediapipe", "meanshape", "flame")
ALBEDO = 0.65
#: Upstream (OpenDR, RingNet renderer) point lights: position in the camera frame
#: (x right, y down, z forward, FLAME metres scaled as upstream) and intensity.
UPSTREAM_LIGHTS = (((-200.0, -100.0, -100.0), 1.0), ((800.0, 10.0, 300.0), 1.0),
                   ((-500.0, 500.0, 1000.0), 0.7))
#: Where upstream's face sits relative to those lights: depth of a typical RingNet
#: fit (tz = 50000 / (0.5 * 224 * cam_s), cam_s ~ 8) and FLAME's face width (m).
UPSTREAM_FACE_DEPTH = 56.0
UPSTREAM_FACE_WIDTH = 0.15
#: Fraction of the face height (chin to forehead-top landmark) the cut reaches above
#: the MediaPipe oval, for the forehead.
FOREHEAD_EXTENSION = 0.25
#: A mask that covers less than this share of the face cut is a failure.
MIN_CUT_COVERAGE = 0.6

N_MESH_VERTICES = 479  # 478 landmarks + the mouth-fill centre
MOUTH_CENTRE = 478


class MaskError(RuntimeError):
    """The mask of one image could not be built (no landmarks, fit failed, empty render)."""


@dataclass
class MaskResult:
    """A face mesh in image geometry and what produced it."""

    backend: str
    vertices: np.ndarray  # (V, 3) float: image column px, image row px, depth px to viewer
    faces: np.ndarray     # (F, 3) int, counter-clockwise seen from the viewer
    landmarks: np.ndarray  # (478, 3) MediaPipe landmarks of the prep image (normalised)
    params: dict[str, Any] = field(default_factory=dict)  # JSON-able fitted parameters


@dataclass
class MaskImages:
    """The three uint8 RGB variants (H, W, 3) and the boolean masks behind them."""

    overlay: np.ndarray
    mask_only: np.ndarray
    mask_only_black: np.ndarray
    cut: np.ndarray       # (H, W) bool: face region
    covered: np.ndarray   # (H, W) bool: rendered mesh inside the cut
    render: np.ndarray    # (H, W, 3) uint8: the full render on white


# --------------------------------------------------------------------------- topology

@functools.lru_cache(maxsize=1)
def _topology() -> tuple[np.ndarray, tuple[tuple[int, ...], ...]]:
    """Face triangles of the 468 mesh points (unoriented) and the boundary loops."""
    from collections import Counter

    from faceaudit.faces.facemesh import tesselation_edges

    edges = {tuple(sorted(map(int, e))) for e in tesselation_edges()}
    adj: dict[int, set[int]] = {}
    for a, b in edges:
        adj.setdefault(a, set()).add(b)
        adj.setdefault(b, set()).add(a)
    cliques = {tuple(sorted((a, b, c))) for a, b in edges for c in adj[a] & adj[b]}
    count = Counter(e for t in cliques for e in ((t[0], t[1]), (t[0], t[2]), (t[1], t[2])))
    # A clique all of whose edges lie on three cliques is a "separating" triangle, not a face.
    tris = [t for t in cliques
            if not all(count[e] > 2 for e in ((t[0], t[1]), (t[0], t[2]), (t[1], t[2])))]
    count = Counter(e for t in tris for e in ((t[0], t[1]), (t[0], t[2]), (t[1], t[2])))
    boundary = [e for e, n in count.items() if n == 1]
    nbr: dict[int, list[int]] = {}
    for a, b in boundary:
        nbr.setdefault(a, []).append(b)
        nbr.setdefault(b, []).append(a)
    loops, seen = [], set()
    for start in sorted(nbr):
        if start in seen:
            continue
        loop, prev, cur = [start], None, start
        seen.add(start)
        while True:
            nxt = [v for v in nbr[cur] if v != prev][0]
            if nxt == start:
                break
            loop.append(nxt)
            seen.add(nxt)
            prev, cur = cur, nxt
        loops.append(tuple(loop))
    return np.array(sorted(tris), dtype=np.int64), tuple(loops)


@functools.lru_cache(maxsize=1)
def face_triangles() -> np.ndarray:
    """(F, 3) triangles over the 479 mesh vertices (478 landmarks + mouth centre), holes closed,
    windings consistent (orientation towards the viewer is set per face by :func:`orient_faces`)."""
    import trimesh

    tris, loops = _topology()
    fills = []
    for loop in loops:
        if 10 in loop:  # the outer face oval stays open
            continue
        if 33 in loop:
            centre = 468  # iris centre of the eye whose outer corner is 33
        elif 263 in loop:
            centre = 473
        else:
            centre = MOUTH_CENTRE
        fills += [(loop[i], loop[(i + 1) % len(loop)], centre) for i in range(len(loop))]
    faces = np.concatenate([tris, np.array(fills, dtype=np.int64)])
    # windings: propagate one orientation over face adjacency (topological, positions unused)
    dummy = np.random.default_rng(0).normal(size=(N_MESH_VERTICES, 3))
    mesh = trimesh.Trimesh(dummy, faces, process=False)
    trimesh.repair.fix_winding(mesh)
    return np.asarray(mesh.faces, dtype=np.int64)


def orient_faces(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Flip all triangles if most of them face away from the viewer (image geometry vertices).

    With x = column and y = row (downwards), a triangle facing the viewer (depth up)
    is clockwise in (x, y) pixel space; pyrender needs it counter-clockwise in its
    y-up frame, which is the same winding, so the area test is done in (x, -y).
    """
    p = flip_y(vertices)
    normals = np.cross(p[faces[:, 1]] - p[faces[:, 0]], p[faces[:, 2]] - p[faces[:, 0]])
    area_weighted_z = normals[:, 2].sum()
    return faces if area_weighted_z >= 0 else faces[:, ::-1].copy()


def flip_y(points: np.ndarray) -> np.ndarray:
    """Image geometry (column, row down, depth) <-> headpose's viewer frame (x, y up, depth):
    the two differ only in the sign of y, so the map is its own inverse."""
    return np.asarray(points, dtype=np.float64) * [1.0, -1.0, 1.0]


def landmarks_to_image(landmarks: np.ndarray, width: int, height: int) -> np.ndarray:
    """(478, 3) normalised MediaPipe landmarks -> (479, 3) mesh vertices in image geometry
    (column px, row px, depth px towards the viewer), with the mouth-fill centre appended."""
    return _append_mouth_centre(flip_y(landmarks_to_viewer(landmarks, width, height)))


def _append_mouth_centre(verts: np.ndarray) -> np.ndarray:
    _, loops = _topology()
    mouth = [loop for loop in loops if 10 not in loop and 33 not in loop and 263 not in loop][0]
    return np.concatenate([verts[:478], verts[list(mouth)].mean(0, keepdims=True)])


# --------------------------------------------------------------------------- backends

class MediaPipeBackend:
    """The detected 478-point mesh itself (the subject's own shape)."""

    name = "mediapipe"

    def build(self, prep_rgb: np.ndarray, landmarks: np.ndarray) -> MaskResult:
        h, w = prep_rgb.shape[:2]
        verts, faces = add_forehead(landmarks_to_image(landmarks, w, h), face_triangles())
        return MaskResult(self.name, verts, faces, np.asarray(landmarks), {"n_vertices": len(verts)})


def derive_mean_shape(landmark_sets: list[tuple[np.ndarray, int, int]]) -> np.ndarray:
    """Population mean face, (478, 3), in the head-pose reference frame (frontal, unit RMS).

    landmark_sets: (landmarks (478, 3) normalised, width, height) of many people.
    Generalised Procrustes mean over all 478 points, then rotated/scaled onto
    :data:`faceaudit.mask.headpose.REFERENCE_SHAPE` so it is frontal by the same convention.
    """
    from faceaudit.mask.headpose import generalised_procrustes_mean

    shapes = [landmarks_to_viewer(lm, w, h) for lm, w, h in landmark_sets]
    mean = generalised_procrustes_mean(shapes)
    rot, s, t = similarity_fit(mean[STABLE_POINTS], REFERENCE_SHAPE)
    return s * mean @ rot.T + t


@functools.lru_cache(maxsize=1)
def bundled_mean_shape() -> np.ndarray:
    """Mean shape of the 400 ORL photos shipped in ``faceaudit/data/orl_faces`` (3x upscaled
    for MediaPipe). About 3 s; cached per process."""
    from faceaudit.faces.facemesh import FaceMesh
    from faceaudit.core.images import read_grey, to_uint8

    root = Path(__file__).resolve().parents[1] / "data" / "orl_faces"
    files = sorted(root.glob("s*/*.pgm"))
    if not files:
        raise InputError(f"no ORL photos under {root}; the package data is incomplete")
    sets = []
    with FaceMesh() as mesh:
        for path in files:
            grey = to_uint8(read_grey(path))
            up = np.kron(grey, np.ones((3, 3), np.uint8))
            lm = mesh.detect(up)
            if lm is not None:
                sets.append((lm, up.shape[1], up.shape[0]))
    return derive_mean_shape(sets)


class MeanShapeBackend:
    """A population mean face placed at the detected pose (similarity fit): identity removed."""

    name = "meanshape"

    def __init__(self, mean_shape: np.ndarray) -> None:
        mean_shape = np.asarray(mean_shape, dtype=np.float64)
        if mean_shape.shape != (478, 3):
            raise InputError(f"a mean shape must be (478, 3), got {mean_shape.shape}")
        self.mean_shape = mean_shape

    def build(self, prep_rgb: np.ndarray, landmarks: np.ndarray) -> MaskResult:
        h, w = prep_rgb.shape[:2]
        target = landmarks_to_viewer(landmarks, w, h)
        rot, s, t = similarity_fit(self.mean_shape[:468], target[:468])
        placed = s * self.mean_shape @ rot.T + t  # viewer frame: x, -row, depth
        verts = _append_mouth_centre(flip_y(placed))
        verts, faces = add_forehead(verts, face_triangles())
        resid = np.sqrt(((placed[:468] - target[:468]) ** 2).sum(1).mean())
        return MaskResult(self.name, verts, faces, np.asarray(landmarks), {
            "rotation": rot.tolist(), "scale": float(s), "translation": t.tolist(),
            "rms_landmark_px": float(resid)})


# --------------------------------------------------------------------------- FLAME

FLAME_FILE = "flame_model.npz"
FLAME_REQUIRED = ("v_template", "shapedirs", "J_regressor", "weights", "kintree_table", "f",
                  "lmk_face_idx", "lmk_b_coords", "lmk_mediapipe_idx")
FLAME_HELP = (
    "FLAME is not redistributable: register at https://flame.is.tue.mpg.de, download FLAME 2020 "
    "(generic_model.pkl) and MICA's mediapipe_landmark_embedding.npz, and convert them once to "
    f"{FLAME_FILE} (see faceaudit.mask.masking.load_flame for the conversion snippet)")


@dataclass
class FlameModel:
    """FLAME-format linear-blend-skinning model (any size; FLAME 2020 has V=5023, J=5)."""

    v_template: np.ndarray   # (V, 3) metres, y up, z towards the face's front
    shapedirs: np.ndarray    # (V, 3, n_shape + n_expr)
    posedirs: np.ndarray     # (V, 3, 9 * (J - 1))
    J_regressor: np.ndarray  # (J, V) dense
    weights: np.ndarray      # (V, J)
    parents: np.ndarray      # (J,) parent joint, -1 for the root
    faces: np.ndarray        # (F, 3)
    lmk_face_idx: np.ndarray  # (L,) triangle of each landmark
    lmk_b_coords: np.ndarray  # (L, 3) barycentric coordinates in it
    lmk_mediapipe_idx: np.ndarray  # (L,) MediaPipe landmark each one corresponds to
    n_shape: int
    n_expr: int

    def landmark_template(self) -> np.ndarray:
        tri = self.v_template[self.faces[self.lmk_face_idx]]  # (L, 3, 3)
        return np.einsum("lk,lkc->lc", self.lmk_b_coords, tri)


def load_flame(path: str | os.PathLike) -> FlameModel:
    """Read a FLAME model converted to ``.npz`` (no pickle).

    Arrays: v_template (V,3), shapedirs (V,3,K), posedirs (V,3,P) [optional, zeros],
    J_regressor (J,V) dense, weights (V,J), kintree_table (2,J), f (F,3), lmk_face_idx (L,),
    lmk_b_coords (L,3), lmk_mediapipe_idx (L,), n_shape () [optional: 300 when K = 400,
    else K minus n_expr], n_expr () [optional: 100 when K = 400, else 0].

    One-time conversion, in an environment of your own where FLAME's pickle may be opened
    (it needs ``chumpy``), from FLAME 2020 and MICA's MediaPipe embedding::

        import pickle, numpy as np
        m = pickle.load(open("generic_model.pkl", "rb"), encoding="latin1")
        e = np.load("mediapipe_landmark_embedding.npz")
        np.savez("flame_model.npz", v_template=np.array(m["v_template"]),
                 shapedirs=np.array(m["shapedirs"]), posedirs=np.array(m["posedirs"]),
                 J_regressor=m["J_regressor"].toarray(), weights=np.array(m["weights"]),
                 kintree_table=np.array(m["kintree_table"]), f=np.array(m["f"]),
                 lmk_face_idx=e["lmk_face_idx"], lmk_b_coords=e["lmk_b_coords"],
                 lmk_mediapipe_idx=e["landmark_indices"], n_shape=300, n_expr=100)
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"expected a FLAME model at {path}, found nothing. {FLAME_HELP}")
    data = read_npz(path, required=FLAME_REQUIRED)
    v = np.asarray(data["v_template"], np.float64)
    n_v = len(v)
    shapedirs = np.asarray(data["shapedirs"], np.float64)
    if v.ndim != 2 or v.shape[1] != 3 or shapedirs.shape[:2] != (n_v, 3):
        raise InputError(f"{path}: v_template must be (V, 3) and shapedirs (V, 3, K); "
                         f"got {v.shape} and {shapedirs.shape}")
    k = shapedirs.shape[2]
    n_expr = int(data["n_expr"]) if "n_expr" in data else (100 if k == 400 else 0)
    n_shape = int(data["n_shape"]) if "n_shape" in data else k - n_expr
    if n_shape + n_expr > k:
        raise InputError(f"{path}: n_shape {n_shape} + n_expr {n_expr} exceed shapedirs' {k}")
    jreg = np.asarray(data["J_regressor"], np.float64)
    n_j = jreg.shape[0]
    parents = np.asarray(data["kintree_table"], np.int64)[0].copy()
    parents[0] = -1  # FLAME stores uint32 max for the root's parent
    posedirs = (np.asarray(data["posedirs"], np.float64) if "posedirs" in data
                else np.zeros((n_v, 3, 9 * (n_j - 1))))
    weights = np.asarray(data["weights"], np.float64)
    if jreg.shape != (n_j, n_v) or weights.shape != (n_v, n_j) or posedirs.shape != (n_v, 3, 9 * (n_j - 1)):
        raise InputError(f"{path}: inconsistent shapes J_regressor {jreg.shape}, weights "
                         f"{weights.shape}, posedirs {posedirs.shape} for V={n_v}, J={n_j}")
    faces = np.asarray(data["f"], np.int64)
    lmk_face_idx = np.asarray(data["lmk_face_idx"], np.int64)
    lmk_mp = np.asarray(data["lmk_mediapipe_idx"], np.int64)
    if faces.max() >= n_v or lmk_face_idx.max() >= len(faces) or lmk_mp.max() >= 478:
        raise InputError(f"{path}: indices out of range: expected f < {n_v} vertices, "
                         f"lmk_face_idx < {len(faces)} faces, lmk_mediapipe_idx < 478; found "
                         f"maxima {faces.max()}, {lmk_face_idx.max()}, {lmk_mp.max()}")
    return FlameModel(v, shapedirs, posedirs, jreg, weights, parents, faces, lmk_face_idx,
                      np.asarray(data["lmk_b_coords"], np.float64), lmk_mp, n_shape, n_expr)


def find_flame(model_dir: str | os.PathLike | None) -> Path:
    """Path of ``flame_model.npz`` in ``model_dir``; a clear InputError when absent."""
    if model_dir is None:
        raise InputError(f"the flame backend needs --model_dir holding {FLAME_FILE}. {FLAME_HELP}")
    path = Path(model_dir) / FLAME_FILE
    if not path.is_file():
        raise InputError(f"expected {FLAME_FILE} in {model_dir}, found nothing. {FLAME_HELP}")
    return path


def _rodrigues(aa):
    import torch

    angle = torch.sqrt((aa ** 2).sum(-1, keepdim=True) + 1e-16)
    axis = aa / angle
    c, s = torch.cos(angle)[..., None], torch.sin(angle)[..., None]
    x, y, z = axis[..., 0], axis[..., 1], axis[..., 2]
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(*aa.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device).expand_as(k)
    return eye + s * k + (1 - c) * (k @ k)


class FlameLayer:
    """Differentiable FLAME forward pass (torch): shape, expression, joint rotations -> vertices."""

    def __init__(self, model: FlameModel, device: str = "cpu") -> None:
        import torch

        t = functools.partial(torch.as_tensor, dtype=torch.float64, device=device)
        self.model, self.device = model, device
        self.v_template = t(model.v_template)
        self.shapedirs = t(model.shapedirs[:, :, :model.n_shape])
        self.exprdirs = t(model.shapedirs[:, :, model.n_shape:model.n_shape + model.n_expr])
        self.posedirs = t(model.posedirs)
        self.J_regressor = t(model.J_regressor)
        self.weights = t(model.weights)
        self.parents = model.parents
        self.faces = torch.as_tensor(model.faces, device=device)
        # joints depend on shape only through J_regressor: regress the blend shapes once
        self.J_template = self.J_regressor @ self.v_template
        self.J_shapedirs = torch.einsum("jv,vck->jck", self.J_regressor, self.shapedirs)
        self.J_exprdirs = torch.einsum("jv,vck->jck", self.J_regressor, self.exprdirs)
        # the fit only needs the vertices of the landmark triangles
        lmk_tris = model.faces[model.lmk_face_idx]
        self.lmk_vertex_idx, local = np.unique(lmk_tris, return_inverse=True)
        self.lmk_faces = torch.as_tensor(local.reshape(lmk_tris.shape), device=device)
        self.lmk_bary = t(model.lmk_b_coords)

    def vertices(self, shape, expr, pose, subset: np.ndarray | None = None):
        """shape (n_shape,), expr (n_expr,), pose (J, 3) axis-angle -> (V, 3) vertices
        (or only the rows ``subset``)."""
        import torch

        sel = slice(None) if subset is None else torch.as_tensor(subset, device=self.device)
        v = (self.v_template[sel] + torch.einsum("vck,k->vc", self.shapedirs[sel], shape)
             + torch.einsum("vck,k->vc", self.exprdirs[sel], expr))
        joints = (self.J_template + torch.einsum("jck,k->jc", self.J_shapedirs, shape)
                  + torch.einsum("jck,k->jc", self.J_exprdirs, expr))
        rots = _rodrigues(pose)  # (J, 3, 3)
        eye = torch.eye(3, dtype=v.dtype, device=v.device)
        feat = (rots[1:] - eye).reshape(-1)
        v = v + torch.einsum("vcp,p->vc", self.posedirs[sel], feat)
        bottom = torch.tensor([[0, 0, 0, 1]], dtype=v.dtype, device=v.device)
        transforms = []
        for j in range(len(self.parents)):
            rel = joints[j] - (joints[self.parents[j]] if self.parents[j] >= 0 else 0)
            local = torch.cat([torch.cat([rots[j], rel[:, None]], 1), bottom], 0)
            transforms.append(local if self.parents[j] < 0 else transforms[self.parents[j]] @ local)
        world = torch.stack(transforms)  # (J, 4, 4)
        # remove the rest-pose joint location so transforms act on rest vertices
        offset = torch.einsum("jab,jb->ja", world[:, :3, :3], joints)
        world = torch.cat([world[:, :3, :3], (world[:, :3, 3] - offset)[..., None]], 2)
        per_vertex = torch.einsum("vj,jab->vab", self.weights[sel], world)
        return torch.einsum("vab,vb->va", per_vertex[:, :, :3], v) + per_vertex[:, :, 3]

    def landmarks(self, lmk_verts):
        """(L, 3) landmarks from the vertices of ``lmk_vertex_idx`` (as vertices(..., subset=))."""
        import torch

        return torch.einsum("lk,lkc->lc", self.lmk_bary, lmk_verts[self.lmk_faces])


class FlameBackend:
    """FLAME fitted to the detected MediaPipe landmarks (orthographic camera), then rendered.

    Fitted: shape (n_shape), expression (n_expr), global and jaw rotation, scale and
    image translation; landmark error in x, y and (weight ``depth_weight``) depth,
    with L2 priors on shape, expression and jaw. Adam, ``iterations`` steps.

    On CPU, torch is set to ``cpu_threads`` threads (1 by default): the problem is tiny,
    and extra threads only fight each other and ``--jobs`` workers (25x slower measured
    on a loaded 2-core machine).
    """

    name = "flame"

    def __init__(self, model: FlameModel, *, device: str | None = None, iterations: int = 150,
                 shape_prior: float = 1e-3, expr_prior: float = 1e-3, depth_weight: float = 0.3,
                 cpu_threads: int | None = 1) -> None:
        import torch

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.cpu_threads = cpu_threads
        self.model = model
        self.layer = FlameLayer(model, self.device)
        self.iterations = int(iterations)
        self.shape_prior, self.expr_prior = float(shape_prior), float(expr_prior)
        self.depth_weight = float(depth_weight)

    def fit(self, target_img: np.ndarray) -> dict[str, Any]:
        """Fit to (L, 3) landmark targets in image geometry (col, row, depth px)."""
        import torch

        threads = torch.get_num_threads()
        if self.device == "cpu" and self.cpu_threads:
            torch.set_num_threads(int(self.cpu_threads))
        try:
            return self._fit(target_img)
        finally:
            torch.set_num_threads(threads)  # leave the process as found

    def _fit(self, target_img: np.ndarray) -> dict[str, Any]:
        import torch
        from scipy.spatial.transform import Rotation

        model, layer = self.model, self.layer
        target_view = flip_y(target_img)
        template = model.landmark_template()
        rot0, s0, _ = similarity_fit(template, target_view)
        # work in units of the landmarks' RMS radius so the data term is O(1) next to the priors
        unit = float(np.sqrt(((template - template.mean(0)) ** 2).sum(1).mean()))
        px_per_unit = s0 * unit
        dt = torch.float64
        dev = self.device
        tgt = torch.as_tensor(target_view, dtype=dt, device=dev) / px_per_unit
        shape = torch.zeros(model.n_shape, dtype=dt, device=dev, requires_grad=True)
        expr = torch.zeros(model.n_expr, dtype=dt, device=dev, requires_grad=True)
        glob = torch.tensor(Rotation.from_matrix(rot0).as_rotvec(), dtype=dt, device=dev,
                            requires_grad=True)
        n_j = len(model.parents)
        jaw = torch.zeros(3, dtype=dt, device=dev, requires_grad=True)
        log_scale = torch.zeros((), dtype=dt, device=dev, requires_grad=True)
        trans = torch.zeros(3, dtype=dt, device=dev, requires_grad=True)
        depth_w = torch.tensor([1.0, 1.0, self.depth_weight], dtype=dt, device=dev)

        def full_pose():
            rows = [glob[None]] + [torch.zeros(1, 3, dtype=dt, device=dev)] * (n_j - 1)
            if n_j > 2:
                rows[2] = jaw[None]  # FLAME joints: global, neck, jaw, eyes
            return torch.cat(rows, 0)

        def predict():
            verts = layer.vertices(shape, expr, full_pose(), subset=layer.lmk_vertex_idx)
            return torch.exp(log_scale) * layer.landmarks(verts) / unit + trans

        with torch.no_grad():  # start with the landmark centroids on top of each other
            lm = predict()
            trans += (tgt - lm).mean(0)
        opt = torch.optim.Adam([shape, expr, glob, jaw, log_scale, trans], lr=0.02)
        for _ in range(self.iterations):
            opt.zero_grad()
            lm = predict()
            diff = (lm - tgt)
            diff = torch.cat([diff[:, :2], (diff[:, 2:] - diff[:, 2:].mean())], 1) * depth_w
            loss = ((diff ** 2).sum(1).mean() + self.shape_prior * (shape ** 2).sum()
                    + self.expr_prior * (expr ** 2).sum() + 1e-2 * (jaw ** 2).sum())
            loss.backward()
            opt.step()
        with torch.no_grad():
            lm = predict()
            verts = layer.vertices(shape, expr, full_pose())
            scale = float(s0 * torch.exp(log_scale))  # px per model unit (metre for FLAME)
            v_view = (torch.exp(log_scale) * verts / unit + trans).cpu().numpy() * px_per_unit
            err = ((lm - tgt)[:, :2] ** 2).sum(1).mean().sqrt().item() * px_per_unit
        return {"vertices_view": v_view, "shape": shape.detach().cpu().numpy(),
                "expression": expr.detach().cpu().numpy(),
                "global_pose": glob.detach().cpu().numpy(), "jaw_pose": jaw.detach().cpu().numpy(),
                "scale": scale, "translation": (trans.detach().cpu().numpy() * px_per_unit),
                "rms_landmark_px": float(err)}

    def build(self, prep_rgb: np.ndarray, landmarks: np.ndarray) -> MaskResult:
        h, w = prep_rgb.shape[:2]
        lm_img = landmarks_to_image(landmarks, w, h)[:478]
        fit = self.fit(lm_img[self.model.lmk_mediapipe_idx])
        if not np.all(np.isfinite(fit["vertices_view"])):
            raise MaskError("FLAME fit diverged (non-finite vertices)")
        vv = fit.pop("vertices_view")
        verts = flip_y(vv)
        faces = orient_faces(verts, self.model.faces)
        params = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in fit.items()}
        params["device"] = self.device
        return MaskResult(self.name, verts, faces, np.asarray(landmarks), params)


def synthetic_flame_model(mean_shape: np.ndarray, *, n_shape: int = 8, n_expr: int = 4,
                          seed: int = 0, width_m: float = 0.15) -> dict[str, np.ndarray]:
    """A small model in FLAME's ``.npz`` layout built on MediaPipe's topology, for tests
    and benchmarks (not a face model anyone should use for results).

    mean_shape: (478, 3) frontal shape (e.g. :func:`derive_mean_shape`). Vertices are
    the 479 mask-mesh vertices scaled to ``width_m`` metres; 5 joints like FLAME (root,
    neck, jaw, eyes); smooth random shape directions; expression directions that move
    the lower face; each landmark sits on a vertex of its MediaPipe point.
    """
    rng = np.random.default_rng(seed)
    verts = _append_mouth_centre(np.asarray(mean_shape, np.float64))
    verts = verts * (width_m / np.ptp(verts[:, 0]))
    faces = face_triangles()
    n_v = len(verts)
    centred = verts - verts.mean(0)
    scale = np.abs(centred).max()

    def smooth_field(k):
        freq = rng.normal(size=(k, 3, 3)) / scale
        phase = rng.uniform(0, 2 * np.pi, size=(k, 3))
        return 0.01 * np.sin(np.einsum("vd,kcd->vck", centred, freq) + phase.T[None])

    shapedirs = smooth_field(n_shape)
    lower = np.clip((verts[MOUTH_CENTRE, 1] + 0.02 - verts[:, 1]) / 0.04, 0, 1)
    exprdirs = smooth_field(n_expr) * lower[:, None, None]
    joints_at = [verts.mean(0) - [0, 0, 0.05], verts.mean(0) - [0, 0.06, 0.05],
                 verts[MOUTH_CENTRE] - [0, 0, 0.06], verts[468], verts[473]]
    jreg = np.zeros((5, n_v))
    for j, p in enumerate(joints_at):  # each joint = mean of its 8 nearest vertices + offset
        near = np.argsort(((verts - p) ** 2).sum(1))[:8]
        jreg[j, near] = 1.0 / 8
    weights = np.zeros((n_v, 5))
    weights[:, 0] = 1.0 - lower
    weights[:, 2] = lower
    kintree = np.array([[np.iinfo(np.uint32).max, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64)
    lmk_mp = np.unique(faces[faces < 478])  # the iris rims are not mesh vertices
    lmk_face_idx = np.array([int(np.flatnonzero((faces == i).any(1))[0]) for i in lmk_mp])
    lmk_b = (faces[lmk_face_idx] == lmk_mp[:, None]).astype(np.float64)
    return {"v_template": verts, "shapedirs": np.concatenate([shapedirs, exprdirs], 2),
            "posedirs": rng.normal(scale=1e-4, size=(n_v, 3, 36)), "J_regressor": jreg,
            "weights": weights, "kintree_table": kintree, "f": faces,
            "lmk_face_idx": lmk_face_idx, "lmk_b_coords": lmk_b, "lmk_mediapipe_idx": lmk_mp,
            "n_shape": np.array(n_shape), "n_expr": np.array(n_expr)}


# --------------------------------------------------------------------------- rendering

class MaskRenderer:
    """pyrender offscreen (EGL) renderer of image-geometry meshes, one per process."""

    def __init__(self, width: int = 224, height: int = 224) -> None:
        os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
        import pyrender

        self.width, self.height = int(width), int(height)
        self._pyrender = pyrender
        self._renderer = pyrender.OffscreenRenderer(self.width, self.height)

    def render(self, vertices: np.ndarray, faces: np.ndarray, *,
               albedo: float = ALBEDO) -> tuple[np.ndarray, np.ndarray]:
        """(V, 3) image-geometry vertices, (F, 3) faces -> RGB uint8 on white, coverage bool."""
        import trimesh

        pyrender = self._pyrender
        w, h = self.width, self.height
        gl = np.stack([vertices[:, 0], h - vertices[:, 1], vertices[:, 2]], axis=1)
        tm = trimesh.Trimesh(gl, faces, process=False)
        material = pyrender.MetallicRoughnessMaterial(
            baseColorFactor=(albedo, albedo, albedo, 1.0), metallicFactor=0.0,
            roughnessFactor=1.0, doubleSided=True)
        scene = pyrender.Scene(bg_color=(1.0, 1.0, 1.0, 1.0), ambient_light=(0, 0, 0))
        scene.add(pyrender.Mesh.from_trimesh(tm, material=material, smooth=True))
        zmin, zmax = float(gl[:, 2].min()), float(gl[:, 2].max())
        cam_z = zmax + 10.0
        cam_pose = np.eye(4)
        cam_pose[:3, 3] = (w / 2.0, h / 2.0, cam_z)
        scene.add(pyrender.OrthographicCamera(xmag=w / 2.0, ymag=h / 2.0, znear=1.0,
                                              zfar=cam_z - zmin + 10.0), pose=cam_pose)
        centre = gl.mean(0)
        px_per_unit = np.ptp(gl[:, 0]) / UPSTREAM_FACE_WIDTH / 100.0
        for (x, y, z), intensity in UPSTREAM_LIGHTS:
            # upstream camera frame (y down, z forward) -> ours (y up, z to the viewer),
            # taken relative to upstream's face position
            offset = np.array([x, -y, UPSTREAM_FACE_DEPTH - z]) * px_per_unit
            pose = np.eye(4)
            pose[:3, 3] = centre + offset
            dist2 = float(offset @ offset)
            # pyrender's point light falls off as 1/d^2 and its diffuse term is albedo/pi:
            # scale so the face receives upstream's Lambertian irradiance.
            scene.add(pyrender.PointLight(color=np.ones(3), intensity=np.pi * intensity * dist2),
                      pose=pose)
        color, depth = self._renderer.render(scene)
        return np.ascontiguousarray(color[:, :, :3]), depth > 0

    def close(self) -> None:
        self._renderer.delete()


def _forehead_ramp(points: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """0 at or below the eye line, rising to 1 at the forehead-top landmark (10), per point.

    points: (N, 2+) pixel positions; lm: landmark pixel positions (x, y first)."""
    up = lm[10, :2] - lm[152, :2]
    face_h = max(float(np.linalg.norm(up)), 1e-6)
    up = up / face_h
    eye_level = ((lm[33, :2] + lm[263, :2]) / 2 - lm[152, :2]) @ up
    height = ((points[:, :2] - lm[152, :2]) @ up - eye_level) / max(face_h - eye_level, 1e-6)
    return np.clip(height, 0.0, 1.0)


def add_forehead(vertices: np.ndarray, faces: np.ndarray, *,
                 forehead: float = FOREHEAD_EXTENSION) -> tuple[np.ndarray, np.ndarray]:
    """Extend a MediaPipe-topology mesh (image geometry) above its oval to cover the forehead.

    MediaPipe's mesh stops at the upper forehead; the face cut reaches higher (as
    upstream's dlib-81 hull). Each oval vertex above the eye line gets a twin moved
    by the same image offset as the cut's hull points (``forehead`` x ramp x
    chin -> forehead-top), set back in depth by 30% of that (the forehead slopes
    back), and the band between the two chains is triangulated.
    """
    import trimesh

    _, loops = _topology()
    oval = [loop for loop in loops if 10 in loop][0]
    ramp = _forehead_ramp(vertices[list(oval)], vertices)
    offset = vertices[10] - vertices[152]
    n = len(vertices)
    new_vertices, twin = [], {}
    for k, v in enumerate(oval):
        if ramp[k] > 0:
            lifted = vertices[v] + forehead * ramp[k] * offset
            lifted[2] -= 0.3 * forehead * ramp[k] * np.linalg.norm(offset[:2])
            twin[v] = n + len(new_vertices)
            new_vertices.append(lifted)
    band = []
    for k, a in enumerate(oval):
        b = oval[(k + 1) % len(oval)]
        if a in twin and b in twin:
            band += [(a, b, twin[b]), (a, twin[b], twin[a])]
    if not band:
        return vertices, faces
    verts = np.concatenate([vertices, np.array(new_vertices)])
    mesh = trimesh.Trimesh(verts, np.concatenate([faces, np.array(band)]), process=False)
    trimesh.repair.fix_winding(mesh)
    return verts, orient_faces(verts, np.asarray(mesh.faces, dtype=np.int64))


def face_cut(landmarks: np.ndarray, width: int, height: int, *,
             forehead: float = FOREHEAD_EXTENSION) -> np.ndarray:
    """(H, W) bool face region: hull of the face-oval landmarks, upper part raised for the forehead.

    Oval points above the eye line move up (along chin -> forehead-top) by up to
    ``forehead`` x face height, more the higher they are, then the convex hull is filled.
    """
    from scipy.spatial import ConvexHull
    from skimage.draw import polygon

    from faceaudit.faces.facemesh import mediapipe_solutions

    lm = np.asarray(landmarks, dtype=np.float64)[:, :2] * [width, height]
    oval = sorted({i for e in mediapipe_solutions().face_mesh.FACEMESH_FACE_OVAL for i in e})
    pts = lm[oval]
    lift = forehead * _forehead_ramp(pts, lm)[:, None] * (lm[10] - lm[152])
    pts = np.concatenate([pts, pts + lift])
    pts[:, 0] = np.clip(pts[:, 0], 0, width - 1)
    pts[:, 1] = np.clip(pts[:, 1], 0, height - 1)
    hull = pts[ConvexHull(pts).vertices]
    rr, cc = polygon(hull[:, 1], hull[:, 0], shape=(height, width))
    cut = np.zeros((height, width), dtype=bool)
    cut[rr, cc] = True
    return cut


def black_background(image: np.ndarray) -> np.ndarray:
    """Set pixels with R = G = B = 255 to black, per pixel (not per channel).

    For images where only the white canvas is exactly (255, 255, 255); the stage
    itself blackens by coverage, so saturated face pixels stay white.
    """
    out = np.array(image, copy=True)
    white = np.all(out[..., :3] == 255, axis=-1)
    out[white] = 0
    return out


def compose(prep_rgb: np.ndarray, render: np.ndarray, covered_render: np.ndarray,
            cut: np.ndarray, *, min_coverage: float = MIN_CUT_COVERAGE) -> MaskImages:
    """Overlay, mask on white, mask on black from a render, its coverage and the face cut.

    Raises MaskError when the rendered mesh covers less than ``min_coverage`` of the cut:
    an image is never passed on with its face (partly) unmasked by accident.
    """
    prep = np.asarray(prep_rgb)
    if prep.ndim == 2:
        prep = np.repeat(prep[:, :, None], 3, axis=2)
    covered = covered_render & cut
    if not cut.any():
        raise MaskError("the face cut is empty")
    share = covered.sum() / cut.sum()
    if share < min_coverage:
        raise MaskError(f"the rendered mask covers {share:.0%} of the face cut "
                        f"(expected >= {min_coverage:.0%})")
    m3 = covered[:, :, None]
    overlay = np.where(m3, render, prep).astype(np.uint8)
    mask_only = np.where(m3, render, 255).astype(np.uint8)
    mask_only_black = np.where(m3, render, 0).astype(np.uint8)
    return MaskImages(overlay, mask_only, mask_only_black, cut, covered, render)


def make_backend(name: str, *, model_dir: str | os.PathLike | None = None,
                 mean_shape: np.ndarray | None = None, device: str | None = None):
    """Backend by name: ``mediapipe`` | ``meanshape`` | ``flame`` (needs model_dir/flame_model.npz)."""
    if name == "mediapipe":
        return MediaPipeBackend()
    if name == "meanshape":
        return MeanShapeBackend(bundled_mean_shape() if mean_shape is None else mean_shape)
    if name == "flame":
        return FlameBackend(load_flame(find_flame(model_dir)), device=device)
    raise InputError(f"unknown masking backend {name!r}; expected one of {', '.join(BACKENDS)}")
