"""FLAME as a mask backend: the ``.npz`` model, a differentiable forward pass (torch),
and a fit of shape, expression, pose and camera to the detected MediaPipe landmarks."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from faceaudit.core.contracts import N_LANDMARKS
from faceaudit.core.files import InputError, read_npz
from faceaudit.core.geometry import umeyama
from faceaudit.mask.topology import (
    MaskError,
    MaskResult,
    flip_y,
    landmarks_to_image,
    orient_faces,
)

FLAME_FILE = "flame_model.npz"
FLAME_REQUIRED = ("v_template", "shapedirs", "J_regressor", "weights", "kintree_table", "f",
                  "lmk_face_idx", "lmk_b_coords", "lmk_mediapipe_idx")
FLAME_HELP = (
    "FLAME is not redistributable: register at https://flame.is.tue.mpg.de, download FLAME 2020 "
    "(generic_model.pkl) and MICA's mediapipe_landmark_embedding.npz, and convert them once to "
    f"{FLAME_FILE} (see faceaudit.mask.flame.load_flame for the conversion snippet)")


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
    if faces.max() >= n_v or lmk_face_idx.max() >= len(faces) or lmk_mp.max() >= N_LANDMARKS:
        raise InputError(f"{path}: indices out of range: expected f < {n_v} vertices, "
                         f"lmk_face_idx < {len(faces)} faces, lmk_mediapipe_idx < {N_LANDMARKS}; found "
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
        rot0, s0, _ = umeyama(template, target_view)
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
        lm_img = landmarks_to_image(landmarks, w, h)[:N_LANDMARKS]
        fit = self.fit(lm_img[self.model.lmk_mediapipe_idx])
        if not np.all(np.isfinite(fit["vertices_view"])):
            raise MaskError("FLAME fit diverged (non-finite vertices)")
        vv = fit.pop("vertices_view")
        verts = flip_y(vv)
        faces = orient_faces(verts, self.model.faces)
        params = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in fit.items()}
        params["device"] = self.device
        return MaskResult(self.name, verts, faces, np.asarray(landmarks), params)
