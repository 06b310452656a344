"""Landmark-set alignment: closed-form Procrustes (Umeyama), one common reference
frame for a whole gallery, and the upstream nearest-neighbour ICP for reproduction.

Shapes are (m, 3) point sets with known index correspondence (landmark i of one
face corresponds to landmark i of another); a batch is (n, m, 3). A transform
maps a source point p to ``s * R @ p + t`` with R a proper rotation (det +1,
never a reflection), s > 0 the scale (1 for rigid) and t a translation.

Why one reference frame: aligning every pair costs n_probes x n_gallery fits;
aligning every face once to a common reference (the generalised Procrustes mean of
the gallery) costs n_probes + n_gallery fits and leaves a plain distance matrix,
so it scales to thousands of faces. It removes pose (and with ``similarity``
size), the shortcut through which PET and CT of one session match "unaligned".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALIGN_MODES = ("none", "rigid", "similarity", "icp")


@dataclass(frozen=True)
class Transform:
    """p -> scale * rotation @ p + translation (batched: leading axes of any size)."""

    rotation: np.ndarray  # (..., 3, 3)
    scale: np.ndarray  # (...,)
    translation: np.ndarray  # (..., 3)

    def apply(self, points: np.ndarray) -> np.ndarray:
        """points (..., m, 3) -> transformed (..., m, 3)."""
        pts = np.asarray(points, dtype=np.float64)
        rotated = np.einsum("...ij,...mj->...mi", self.rotation, pts)
        return np.asarray(self.scale)[..., None, None] * rotated + self.translation[..., None, :]


def umeyama(source: np.ndarray, target: np.ndarray, *, scale: bool = True) -> Transform:
    """Least-squares similarity (``scale=True``) or rigid transform taking source to target.

    Umeyama (1991), closed form, reflections excluded. source, target: (m, d) or
    batched (n, m, d) with the same shapes (a single (m, d) target is broadcast
    against a batch of sources). Minimises sum_i |target_i - (s R source_i + t)|^2.
    """
    src = np.asarray(source, dtype=np.float64)
    tgt = np.asarray(target, dtype=np.float64)
    if src.ndim < 2 or src.shape[-2:] != tgt.shape[-2:]:
        raise ValueError(f"source {src.shape} and target {tgt.shape} must be (..., m, d) alike")
    tgt = np.broadcast_to(tgt, src.shape)
    m, d = src.shape[-2:]
    mu_s = src.mean(axis=-2)
    mu_t = tgt.mean(axis=-2)
    sc = src - mu_s[..., None, :]
    tc = tgt - mu_t[..., None, :]
    cov = np.einsum("...mi,...mj->...ij", tc, sc) / m  # Sigma_ts (d, d)
    u, sing, vt = np.linalg.svd(cov)
    sign = np.sign(np.linalg.det(u) * np.linalg.det(vt))
    sign = np.where(sign == 0, 1.0, sign)
    diag = np.ones(src.shape[:-2] + (d,))
    diag[..., -1] = sign
    rot = np.einsum("...ij,...j,...jk->...ik", u, diag, vt)
    if scale:
        var_s = (sc ** 2).sum(axis=(-1, -2)) / m
        with np.errstate(divide="ignore", invalid="ignore"):
            s = (sing * diag).sum(axis=-1) / var_s
        s = np.where(var_s > 0, s, 1.0)
    else:
        s = np.ones(src.shape[:-2])
    trans = mu_t - s[..., None] * np.einsum("...ij,...j->...i", rot, mu_s)
    return Transform(rotation=rot, scale=np.asarray(s), translation=trans)


def align_to(shapes: np.ndarray, reference: np.ndarray, *, mode: str = "similarity") -> np.ndarray:
    """Align each shape to ``reference`` (m, 3): (m, 3) or (n, m, 3) -> same shape.

    mode: "rigid" (rotation + translation) or "similarity" (+ isotropic scale).
    Rows containing NaN (no landmarks) stay NaN.
    """
    if mode not in ("rigid", "similarity"):
        raise ValueError(f"align_to mode must be 'rigid' or 'similarity', got {mode!r}")
    arr = np.asarray(shapes, dtype=np.float64)
    single = arr.ndim == 2
    batch = arr[None] if single else arr
    out = np.full_like(batch, np.nan)
    valid = np.isfinite(batch).all(axis=(-1, -2))
    if valid.any():
        tf = umeyama(batch[valid], reference, scale=(mode == "similarity"))
        out[valid] = tf.apply(batch[valid])
    return out[0] if single else out


def centroid_size(shapes: np.ndarray) -> np.ndarray:
    """Root of the summed squared distances of the points to their centroid: (..., m, 3) -> (...)."""
    arr = np.asarray(shapes, dtype=np.float64)
    centred = arr - arr.mean(axis=-2, keepdims=True)
    return np.sqrt((centred ** 2).sum(axis=(-1, -2)))


def procrustes_mean(shapes: np.ndarray, *, mode: str = "similarity", max_iter: int = 20,
                    tol: float = 1e-10) -> np.ndarray:
    """Generalised Procrustes mean of a set of shapes (n, m, 3) -> (m, 3).

    Starts from the first valid shape, aligns all shapes to the current mean and
    re-averages until the mean moves less than ``tol`` (squared, per point). NaN
    rows are ignored. The mean is centred and, for ``similarity``, rescaled to the
    average centroid size of the inputs so distances stay in the input units.
    """
    arr = np.asarray(shapes, dtype=np.float64)
    if arr.ndim != 3:
        raise ValueError(f"expected shapes (n, m, 3), got {arr.shape}")
    valid = arr[np.isfinite(arr).all(axis=(-1, -2))]
    if len(valid) == 0:
        raise ValueError("procrustes_mean needs at least one shape without NaN")
    target_size = float(centroid_size(valid).mean())
    mean = valid[0] - valid[0].mean(axis=0)
    for _ in range(max_iter):
        aligned = align_to(valid, mean, mode=mode)
        new = aligned.mean(axis=0)
        new -= new.mean(axis=0)
        if mode == "similarity":
            size = centroid_size(new)
            if size > 0:
                new *= target_size / size
        # keep the mean in the frame of the previous one (the average can drift in rotation)
        new = align_to(new, mean, mode="rigid")
        change = float(((new - mean) ** 2).sum(axis=-1).mean())
        mean = new
        if change < tol:
            break
    return mean


def icp_point_to_point(source: np.ndarray, target: np.ndarray, *, max_correspondence_distance: float = 1.0,
                       max_iteration: int = 30, relative_fitness: float = 1e-6,
                       relative_rmse: float = 1e-6, init: np.ndarray | None = None,
                       target_tree=None) -> tuple[np.ndarray, float, float]:
    """Rigid point-to-point ICP with nearest-neighbour correspondences (Open3D's loop).

    Re-implements ``open3d.pipelines.registration.registration_icp`` with
    ``TransformationEstimationPointToPoint(with_scaling=False)`` and
    ``ICPConvergenceCriteria(relative_fitness, relative_rmse, max_iteration)``:
    correspondences are each source point's nearest target point within
    ``max_correspondence_distance``; stop when fitness and inlier RMSE both change
    by less than the criteria (absolute differences, as Open3D does).

    source (m, 3), target (k, 3). Returns (4x4 transformation, fitness, inlier_rmse).
    ``target_tree``: an optional prebuilt ``scipy.spatial.cKDTree`` of ``target``.
    """
    from scipy.spatial import cKDTree

    src = np.asarray(source, dtype=np.float64)
    tgt = np.asarray(target, dtype=np.float64)
    tree = target_tree if target_tree is not None else cKDTree(tgt)
    transformation = np.eye(4) if init is None else np.array(init, dtype=np.float64)
    moved = src @ transformation[:3, :3].T + transformation[:3, 3]

    def evaluate(points):
        dist, idx = tree.query(points, k=1, distance_upper_bound=max_correspondence_distance)
        ok = np.isfinite(dist)
        n_ok = int(ok.sum())
        fitness = n_ok / len(points) if len(points) else 0.0
        rmse = float(np.sqrt(np.mean(dist[ok] ** 2))) if n_ok else 0.0
        return ok, idx, fitness, rmse

    ok, idx, fitness, rmse = evaluate(moved)
    for _ in range(max_iteration):
        if not ok.any():
            break
        tf = umeyama(moved[ok], tgt[idx[ok]], scale=False)
        update = np.eye(4)
        update[:3, :3] = tf.rotation
        update[:3, 3] = tf.translation
        transformation = update @ transformation
        moved = moved @ tf.rotation.T + tf.translation
        prev_fitness, prev_rmse = fitness, rmse
        ok, idx, fitness, rmse = evaluate(moved)
        if abs(prev_fitness - fitness) < relative_fitness and abs(prev_rmse - rmse) < relative_rmse:
            break
    return transformation, fitness, rmse


def icp_distance_matrix(probes: np.ndarray, gallery: np.ndarray, *, progress: bool = False,
                        **icp_options) -> np.ndarray:
    """Upstream ``--icp`` distances: for each (probe, gallery) pair, ICP the gallery
    (CT) landmarks onto the probe (PET) landmarks, then take the Frobenius norm of
    the index-wise difference. probes (P, m, 3), gallery (G, m, 3) -> (P, G);
    NaN where either set is missing. Cost: P x G ICP runs.
    """
    from scipy.spatial import cKDTree
    from tqdm.auto import tqdm

    probes = np.asarray(probes, dtype=np.float64)
    gallery = np.asarray(gallery, dtype=np.float64)
    out = np.full((len(probes), len(gallery)), np.nan)
    g_ok = np.isfinite(gallery).all(axis=(-1, -2))
    for i in tqdm(range(len(probes)), desc="icp", disable=not progress):
        probe = probes[i]
        if not np.isfinite(probe).all():
            continue
        tree = cKDTree(probe)
        for j in np.flatnonzero(g_ok):
            tf, _, _ = icp_point_to_point(gallery[j], probe, target_tree=tree, **icp_options)
            moved = gallery[j] @ tf[:3, :3].T + tf[:3, 3]
            out[i, j] = np.linalg.norm(probe - moved)
    return out


def pairwise_distances(probes: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Frobenius norm of every (probe, gallery) landmark difference: (P, m, 3), (G, m, 3) -> (P, G).

    One matrix product (|a|^2 + |b|^2 - 2 a.b); NaN where either set is missing.
    Near-identical pairs (where the expansion cancels) are recomputed directly, so
    identical sets are exactly 0.
    """
    probes = np.asarray(probes, dtype=np.float64)
    gallery = np.asarray(gallery, dtype=np.float64)
    # explicit width: reshape(0, -1) is undefined for an empty probe set or gallery
    width = int(np.prod(gallery.shape[1:]))
    p = probes.reshape(len(probes), width)
    g = gallery.reshape(len(gallery), width)
    p_ok = np.isfinite(p).all(axis=1)
    g_ok = np.isfinite(g).all(axis=1)
    pz = np.where(p_ok[:, None], p, 0.0)
    gz = np.where(g_ok[:, None], g, 0.0)
    # centre on a common offset first: MediaPipe coordinates sit near 0.5, and the
    # expansion loses precision when the norms dwarf the differences
    offset = gz[g_ok].mean(axis=0) if g_ok.any() else np.zeros(p.shape[1])
    pz = pz - offset
    gz = gz - offset
    norms = (pz ** 2).sum(axis=1)[:, None] + (gz ** 2).sum(axis=1)[None, :]
    sq = norms - 2.0 * pz @ gz.T
    # near-identical pairs lose all their digits to cancellation: compute those directly
    ii, jj = np.nonzero(sq < 1e-6 * norms)
    if len(ii):
        sq[ii, jj] = ((pz[ii] - gz[jj]) ** 2).sum(axis=1)
    d = np.sqrt(np.maximum(sq, 0.0))
    d[~p_ok, :] = np.nan
    d[:, ~g_ok] = np.nan
    return d
