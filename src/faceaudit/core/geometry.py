"""Point-set geometry shared by both pipelines: one Umeyama fit, one Procrustes mean,
Euler angles.

Shapes are (m, d) point sets with known index correspondence (point i of one shape
corresponds to point i of another); a batch is (n, m, d). A transform maps a source
point p to ``s * R @ p + t`` with R a proper rotation (det +1, never a reflection),
s > 0 the scale (1 for a rigid fit) and t a translation. Points are row vectors, so
for an (m, d) array that is ``s * points @ R.T + t``.

Euler angles go through :class:`scipy.spatial.transform.Rotation`; the order is
scipy's: upper case is intrinsic (``"YXZ"``: R = Ry(a) @ Rx(b) @ Rz(c)), lower case
extrinsic.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class SimilarityTransform(NamedTuple):
    """p -> scale * rotation @ p + translation; batched over any leading axes.

    A tuple, so ``R, s, t = umeyama(source, target)`` unpacks it.
    """

    rotation: np.ndarray            # (..., d, d) proper rotation
    scale: float | np.ndarray       # float, or (...,) for a batch
    translation: np.ndarray         # (..., d)

    def apply(self, points: np.ndarray) -> np.ndarray:
        """points (..., m, d) -> transformed (..., m, d)."""
        pts = np.asarray(points, dtype=np.float64)
        rotated = np.einsum("...ij,...mj->...mi", self.rotation, pts)
        return np.asarray(self.scale)[..., None, None] * rotated + self.translation[..., None, :]


def umeyama(source: np.ndarray, target: np.ndarray, *, scale: bool = True) -> SimilarityTransform:
    """Least-squares similarity (``scale=True``) or rigid (``scale=False``) transform
    taking ``source`` to ``target``: minimises sum_i |target_i - (s R source_i + t)|^2.

    Umeyama (1991), closed form, reflections excluded (the nearest proper rotation).

    Parameters
    ----------
    source, target : (m, d) or batched (n, m, d) point sets of the same shape; a single
        (m, d) target is broadcast against a batch of sources.
    scale : fit an isotropic scale; False gives s = 1.

    Returns
    -------
    SimilarityTransform
        ``(R, s, t)``: R (..., d, d), s a float (an (n,) array for a batch; 1 where the
        source has no spread), t (..., d).
    """
    src = np.asarray(source, dtype=np.float64)
    tgt = np.asarray(target, dtype=np.float64)
    if src.ndim < 2 or src.shape[-2:] != tgt.shape[-2:]:
        raise ValueError(f"expected source and target of shape (..., m, d) alike, found "
                         f"{src.shape} and {tgt.shape}")
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
    return SimilarityTransform(rot, float(s) if np.ndim(s) == 0 else s, trans)


def align_to(shapes: np.ndarray, reference: np.ndarray, *, scale: bool = True) -> np.ndarray:
    """Each shape moved onto ``reference`` (m, d) by its own Umeyama fit.

    shapes : (m, d) or (n, m, d); a shape holding NaN (no landmarks) stays all NaN.
    scale : similarity (True) or rigid (False) fit.
    Returns the aligned shapes, same shape as ``shapes``.
    """
    arr = np.asarray(shapes, dtype=np.float64)
    single = arr.ndim == 2
    batch = arr[None] if single else arr
    out = np.full_like(batch, np.nan)
    valid = np.isfinite(batch).all(axis=(-1, -2))
    if valid.any():
        out[valid] = umeyama(batch[valid], reference, scale=scale).apply(batch[valid])
    return out[0] if single else out


def centroid_size(shapes: np.ndarray) -> np.ndarray | float:
    """Root of the summed squared distances of the points to their centroid:
    (..., m, d) -> (...) (a float for one shape). The RMS radius is this / sqrt(m)."""
    arr = np.asarray(shapes, dtype=np.float64)
    centred = arr - arr.mean(axis=-2, keepdims=True)
    size = np.sqrt((centred ** 2).sum(axis=(-1, -2)))
    return float(size) if np.ndim(size) == 0 else size


def procrustes_mean(shapes: np.ndarray, *, scale: bool = True, max_iter: int = 20,
                    tol: float = 1e-10) -> np.ndarray:
    """Generalised Procrustes mean of a set of shapes: (n, m, d) -> (m, d).

    Starts from the first valid shape, aligns every shape to the current mean
    (similarity with ``scale``, else rigid) and re-averages until the mean moves less
    than ``tol`` (mean squared point displacement) or ``max_iter`` rounds. Shapes
    holding NaN are ignored. The mean is centred; with ``scale`` it is rescaled to
    the average centroid size of the inputs, so distances stay in the input units
    (divide by :func:`centroid_size` / sqrt(m) for a unit-RMS mean). Each new mean
    is rigidly re-aligned to the previous one, so the average cannot drift in rotation.
    """
    arr = np.asarray(shapes, dtype=np.float64)
    if arr.ndim != 3:
        raise ValueError(f"expected shapes of shape (n, m, d), found {arr.shape}")
    valid = arr[np.isfinite(arr).all(axis=(-1, -2))]
    if len(valid) == 0:
        raise ValueError("procrustes_mean needs at least one shape without NaN, found none")
    target_size = float(np.mean(centroid_size(valid)))
    mean = valid[0] - valid[0].mean(axis=0)
    for _ in range(max_iter):
        new = align_to(valid, mean, scale=scale).mean(axis=0)
        new -= new.mean(axis=0)
        if scale:
            size = centroid_size(new)
            if size > 0:
                new *= target_size / size
        new = align_to(new, mean, scale=False)
        change = float(((new - mean) ** 2).sum(axis=-1).mean())
        mean = new
        if change < tol:
            break
    return mean


def euler_angles(rotation: np.ndarray, *, order: str = "YXZ", degrees: bool = True) -> np.ndarray:
    """Euler angles of a rotation matrix, through ``scipy.spatial.transform.Rotation``.

    rotation : (3, 3) or (n, 3, 3) proper rotation(s).
    order : scipy's sequence; ``"YXZ"`` (intrinsic) gives (a, b, c) with
        R = Ry(a) @ Rx(b) @ Rz(c), a and c in [-180, 180], b in [-90, 90] degrees.
    Returns (3,) or (n, 3) angles, in degrees unless ``degrees=False``. At gimbal lock
    (|b| = 90) scipy sets the third angle to 0 and warns.
    """
    from scipy.spatial.transform import Rotation

    return Rotation.from_matrix(np.asarray(rotation, dtype=np.float64)).as_euler(order, degrees=degrees)


def rotation_from_euler(angles: np.ndarray, *, order: str = "YXZ", degrees: bool = True) -> np.ndarray:
    """Inverse of :func:`euler_angles`: (3,) or (n, 3) angles -> (3, 3) or (n, 3, 3)."""
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler(order, np.asarray(angles, dtype=np.float64), degrees=degrees).as_matrix()


__all__ = ["SimilarityTransform", "align_to", "centroid_size", "euler_angles", "procrustes_mean",
           "rotation_from_euler", "umeyama"]
