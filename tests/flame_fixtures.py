"""A small model in FLAME's ``.npz`` layout for tests and benchmarks (test-only)."""

from __future__ import annotations

import numpy as np

from faceaudit.mask.topology import MOUTH_CENTRE, append_mouth_centre, face_triangles


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
    verts = append_mouth_centre(np.asarray(mean_shape, np.float64))
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
