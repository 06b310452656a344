"""Face-mesh landmarks on renders: placement, inter-ocular distance, landmark error.

Landmark sets are (478, 3) float arrays in MediaPipe's normalised convention
(x, y in [0, 1] of the image width and height, z a relative depth); a batch is
(n, 478, 3) with NaN rows for images where no face was found.

Landmark error (the upstream ``get_distance_landmarks``), in % of the inter-ocular
distance (IOD) of the *reference* (CT) landmarks::

    MAD = 100 * sum_i (|x_ref_i - x_i| + |y_ref_i - y_i|) / (IOD * n)

with n = 478 (the number of points summed) by default, and n = 468 with
``upstream=True`` (upstream divides the 478-point sum by 468). z is not used.
"Well placed" means MAD < 15 %.

The placement stage writes each fold's landmarks of one image variant to
``landmarks_<variant>.npz`` (:func:`faceaudit.core.contracts.landmarks_file`); the
matching stage reads them with :func:`read_landmark_set`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from faceaudit.core.contracts import N_FACE_LANDMARKS, N_LANDMARKS, landmarks_file
from faceaudit.core.files import InputError, read_npz

#: "Well placed" threshold on the MAD, in % of the IOD (upstream).
WELL_PLACED_MAD = 15.0


@lru_cache(maxsize=1)
def _eye_indices() -> tuple[np.ndarray, np.ndarray]:
    from faceaudit.faces.facemesh import eye_contour_indices

    return eye_contour_indices()


def eye_centres(landmarks: np.ndarray) -> np.ndarray:
    """Centres of the two eyes, as upstream ``normalization_eyes`` defines them.

    For each eye contour (MediaPipe's FACEMESH_LEFT_EYE / FACEMESH_RIGHT_EYE), the
    points are sorted by x and the centre is the midpoint of the extreme-left and
    extreme-right points (the eye corners), in x and y.

    landmarks : (..., 478, 3) or (..., 478, 2) normalised coordinates.
    Returns (..., 2, 2): [left-eye centre, right-eye centre], each (x, y).
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.ndim < 2 or lm.shape[-2] < N_FACE_LANDMARKS or lm.shape[-1] < 2:
        raise ValueError(f"expected (..., 478, 3) landmarks, got shape {lm.shape}")
    centres = []
    for idx in _eye_indices():
        eye = lm[..., idx, :2]  # (..., m, 2)
        # argsort on x; the corners are the first and last points in that order
        order = np.argsort(eye[..., 0], axis=-1, kind="stable")
        first = np.take_along_axis(eye, order[..., :1, None], axis=-2)[..., 0, :]
        last = np.take_along_axis(eye, order[..., -1:, None], axis=-2)[..., 0, :]
        centres.append((first + last) / 2.0)
    return np.stack(centres, axis=-2)


def inter_ocular_distance(landmarks: np.ndarray) -> np.ndarray | float:
    """Euclidean distance between the two eye centres, in normalised units.

    landmarks : (478, 3) -> float, or (n, 478, 3) -> (n,) array (NaN for NaN rows).
    """
    c = eye_centres(landmarks)
    iod = np.linalg.norm(c[..., 0, :] - c[..., 1, :], axis=-1)
    return float(iod) if np.ndim(iod) == 0 else iod


def landmark_mad(reference: np.ndarray, placed: np.ndarray, *, upstream: bool = False) -> np.ndarray | float:
    """Landmark error of ``placed`` against ``reference`` (CT), in % of the reference IOD.

    reference, placed : (478, 3) -> float, or (n, 478, 3) -> (n,) array; NaN where
        either set is missing (NaN rows).
    upstream : divide by 468 (upstream ``FACEMESH_NUM_LANDMARKS``) instead of the
        number of points summed.
    """
    ref = np.asarray(reference, dtype=np.float64)
    pts = np.asarray(placed, dtype=np.float64)
    if ref.shape != pts.shape:
        raise ValueError(f"reference {ref.shape} and placed {pts.shape} landmark shapes differ")
    n_points = ref.shape[-2]
    divisor = N_FACE_LANDMARKS if upstream else n_points
    l1 = np.abs(ref[..., :2] - pts[..., :2]).sum(axis=(-1, -2))
    iod = np.asarray(inter_ocular_distance(ref))
    with np.errstate(divide="ignore", invalid="ignore"):
        mad = 100.0 * l1 / (iod * divisor)
    return float(mad) if np.ndim(mad) == 0 else mad


def well_placed(mad: np.ndarray, *, threshold: float = WELL_PLACED_MAD) -> np.ndarray:
    """True where MAD < threshold; NaN (not detected) counts as not well placed."""
    mad = np.asarray(mad, dtype=np.float64)
    return np.where(np.isnan(mad), False, mad < threshold)


# --------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class Framing:
    """How an image is prepared for the face mesh: zero-pad ``pad`` pixels on every
    side (as a fraction of the image size if < 1), then scale by ``upscale``.

    Upstream feeds the 208 x 208 crop as is (upscale 1, pad 0). MediaPipe's face
    detector looks at a 128 x 128 view, so a face filling the whole frame can be
    missed; padding gives it context, upscaling helps with very small renders.
    """

    upscale: float = 1.0
    pad: float = 0.0

    def __post_init__(self) -> None:
        if not self.upscale > 0:
            raise ValueError(f"upscale must be > 0, got {self.upscale}")
        if not self.pad >= 0:
            raise ValueError(f"pad must be >= 0, got {self.pad}")

    def pad_pixels(self, shape: tuple[int, int]) -> tuple[int, int]:
        h, w = shape
        if 0 < self.pad < 1:
            return int(round(self.pad * h)), int(round(self.pad * w))
        return int(self.pad), int(self.pad)

    def apply(self, image: np.ndarray) -> np.ndarray:
        """(H, W) grey float [0, 1] -> framed grey float image."""
        img = np.asarray(image, dtype=np.float32)
        ph, pw = self.pad_pixels(img.shape[:2])
        if ph or pw:
            img = np.pad(img, ((ph, ph), (pw, pw)), mode="constant")
        if self.upscale != 1.0:
            from PIL import Image

            h, w = img.shape
            size = (max(1, int(round(w * self.upscale))), max(1, int(round(h * self.upscale))))
            img = np.asarray(Image.fromarray(img).resize(size, Image.BICUBIC), dtype=np.float32)
            img = np.clip(img, 0.0, 1.0)
        return img

    def to_original(self, landmarks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """Map normalised landmarks of the framed image back to the original (H, W) image.

        x and y are re-normalised to the original width and height; z (scaled like x
        by MediaPipe) is re-scaled by the same factor as x.
        """
        h, w = shape
        ph, pw = self.pad_pixels(shape)
        hf, wf = h + 2 * ph, w + 2 * pw  # framed size before the resample (ratios are kept)
        out = np.array(landmarks, dtype=np.float64, copy=True)
        out[..., 0] = (out[..., 0] * wf - pw) / w
        out[..., 1] = (out[..., 1] * hf - ph) / h
        out[..., 2] = out[..., 2] * wf / w
        return out


def place_landmarks(image: np.ndarray, mesh, *, framing: Framing = Framing()) -> np.ndarray | None:
    """478 landmarks of the face in a grey image, or None.

    image : (H, W) float [0, 1] or uint8 grey.
    mesh : a ``faceaudit.faces.facemesh.FaceMesh`` (or anything with ``detect(image)``).
    Returns (478, 3) in the original image's normalised coordinates.
    """
    img = np.asarray(image)
    if img.dtype == np.uint8:
        img = img.astype(np.float32) / 255.0
    if img.ndim != 2:
        raise ValueError(f"expected a grey (H, W) image, got shape {img.shape}")
    lm = mesh.detect(framing.apply(img))
    if lm is None:
        return None
    return framing.to_original(lm, img.shape)


@lru_cache(maxsize=None)
def _cached_mesh(min_detection_confidence: float):
    """One FaceMesh per process and confidence (static mode: images are independent)."""
    from faceaudit.faces.facemesh import FaceMesh

    return FaceMesh(min_detection_confidence=min_detection_confidence)


def place_landmarks_batch(images, *, framing: Framing = Framing(),
                          min_detection_confidence: float = 0.5,
                          mesh=None) -> tuple[np.ndarray, np.ndarray]:
    """Landmarks for a batch of grey images.

    images : (n, H, W) array or a sequence of (H, W) grey images (float [0, 1] or uint8).
    mesh : optional detector with ``detect(image)``; default a cached MediaPipe FaceMesh.
    Returns ``landmarks`` (n, 478, 3) float64, NaN where no face was found, and
    ``detected`` (n,) bool.
    """
    mesh = mesh if mesh is not None else _cached_mesh(min_detection_confidence)
    images = list(images)
    landmarks = np.full((len(images), N_LANDMARKS, 3), np.nan)
    detected = np.zeros(len(images), dtype=bool)
    for i, img in enumerate(images):
        lm = place_landmarks(img, mesh, framing=framing)
        if lm is not None:
            if lm.shape != (N_LANDMARKS, 3):
                raise ValueError(f"face mesh returned {lm.shape} landmarks, expected ({N_LANDMARKS}, 3)")
            landmarks[i] = lm
            detected[i] = True
    return landmarks, detected


# --------------------------------------------------------------------------- landmark files


@dataclass
class LandmarkSet:
    """Landmarks of n images: ids (n,), subjects (n,), landmarks (n, 478, 3) NaN where
    absent, detected (n,) bool; ``source`` names the file they came from."""

    ids: np.ndarray
    subjects: np.ndarray
    landmarks: np.ndarray
    detected: np.ndarray
    source: str = ""

    def subset(self, mask: np.ndarray) -> LandmarkSet:
        return LandmarkSet(self.ids[mask], self.subjects[mask], self.landmarks[mask],
                           self.detected[mask], self.source)


def read_landmark_set(path: str | Path) -> LandmarkSet:
    """Read a ``landmarks_<variant>.npz``: arrays ``ids`` and ``landmarks`` (n, 478, 3),
    optional ``subjects`` (default: the ids) and ``detected`` (default: rows without NaN).

    A missing, corrupt or malformed file (wrong shape, lengths that disagree, a detected
    row holding NaN, an id twice) is an InputError naming the file.
    """
    path = Path(path)
    data = read_npz(path, required=("ids", "landmarks"))
    ids = data["ids"].astype(str)
    lm = np.asarray(data["landmarks"], dtype=np.float64)
    if lm.shape != (len(ids), N_LANDMARKS, 3):
        raise InputError(f"expected landmarks of shape ({len(ids)}, {N_LANDMARKS}, 3) for "
                         f"{len(ids)} ids at {path}, found {lm.shape}")
    subjects = data["subjects"].astype(str) if "subjects" in data else ids.copy()
    if len(subjects) != len(ids):
        raise InputError(f"expected one subject per id at {path}, found {len(subjects)} for {len(ids)} ids")
    finite = np.isfinite(lm).all(axis=(1, 2))
    detected = data["detected"].astype(bool) if "detected" in data else finite
    if len(detected) != len(ids):
        raise InputError(f"expected one detected flag per id at {path}, found {len(detected)} "
                         f"for {len(ids)} ids")
    if np.any(detected & ~finite):
        raise InputError(f"expected finite landmarks for every detected face at {path}, found "
                         f"{int(np.sum(detected & ~finite))} detected with NaN")
    lm[~detected] = np.nan
    if len(set(ids.tolist())) != len(ids):
        raise InputError(f"expected each id once at {path}, found duplicate ids")
    return LandmarkSet(ids, subjects, lm, detected, str(path))


#: Ids and subjects of distractors start with this, so a distractor never counts as a true match.
DISTRACTOR_PREFIX = "distractor:"


def read_distractors(path: str | Path, *, variant: str = "ct") -> list[LandmarkSet]:
    """Landmarks of other people, one set per file: a single .npz, or a folder of them.

    In a folder, the ``landmarks_<variant>.npz`` files are used when there are any
    (so another placement output contributes its CT faces, not its PET ones), else
    every ``*.npz``. Only detected faces are kept. Ids and subjects get a
    ``distractor:<file>:`` prefix so a distractor never counts as a true match.
    """
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(path.rglob(landmarks_file(".", variant).name)) or sorted(path.rglob("*.npz"))
        if not files:
            raise InputError(f"expected .npz landmark files in --distractors {path}, found none")
    else:
        raise InputError(f"expected a landmarks .npz or a folder of them at --distractors {path}, "
                         f"found no such file or folder")
    parts = []
    for f in files:
        s = read_landmark_set(f)
        s = s.subset(s.detected)
        tag = f"{DISTRACTOR_PREFIX}{f.relative_to(path) if path.is_dir() else f.name}:"
        parts.append(LandmarkSet(np.char.add(tag, s.ids), np.char.add(tag, s.subjects),
                                 s.landmarks, s.detected, str(f)))
    return parts


def distractors_for(parts: list[LandmarkSet] | None, *exclude: str | Path) -> LandmarkSet | None:
    """All distractor sets except those read from ``exclude`` (the fold's own files), so
    ``--distractors LM`` pools the other folds' faces into each fold's gallery."""
    if not parts:
        return None
    skip = {Path(p).resolve() for p in exclude}
    keep = [p for p in parts if Path(p.source).resolve() not in skip]
    if not keep:
        return None
    return LandmarkSet(np.concatenate([p.ids for p in keep]), np.concatenate([p.subjects for p in keep]),
                       np.concatenate([p.landmarks for p in keep]), np.concatenate([p.detected for p in keep]),
                       ",".join(p.source for p in keep))


def concat_sets(a: LandmarkSet, b: LandmarkSet | None) -> LandmarkSet:
    if b is None or len(b.ids) == 0:
        return a
    if a.landmarks.shape[1:] != b.landmarks.shape[1:]:
        raise InputError(f"expected distractor landmarks of shape {a.landmarks.shape[1:]} like the "
                         f"gallery's, found {b.landmarks.shape[1:]} in {b.source}")
    return LandmarkSet(np.concatenate([a.ids, b.ids]), np.concatenate([a.subjects, b.subjects]),
                       np.concatenate([a.landmarks, b.landmarks]), np.concatenate([a.detected, b.detected]),
                       a.source)


# --------------------------------------------------------------------------- tables of the placement stage


def _fold_rate_rows(per_fold: dict[str, dict[int, np.ndarray]], folds: list[int]) -> list[dict]:
    rows = []
    for variant, by_fold in per_fold.items():
        scored = [k for k in folds if k in by_fold]
        rates = [float(np.mean(by_fold[k])) if len(by_fold[k]) else float("nan") for k in scored]
        rows.append({"variant": variant, **{f"fold{k}": r for k, r in zip(scored, rates)},
                     "mean": float(np.nanmean(rates)), "std": float(np.nanstd(rates)),  # ddof 0, as upstream
                     "n": int(sum(len(by_fold[k]) for k in scored)), "folds_scored": len(scored)})
    return rows


def detection_table(detected: dict[str, dict[int, np.ndarray]], folds: list[int]) -> list[dict]:
    """Per variant: fraction of test images with a face found, per fold, mean ± std (ddof 0)."""
    return _fold_rate_rows(detected, folds)


def placement_table(mads: dict[str, dict[int, np.ndarray]], folds: list[int], *,
                    threshold: float = WELL_PLACED_MAD) -> list[dict]:
    """Per PET variant: median MAD per fold (over images with both faces found) and the
    well-placed rate (MAD < threshold among ALL test images, as upstream)."""
    rows = []
    for variant, by_fold in mads.items():
        scored = [k for k in folds if k in by_fold]
        medians = [float(np.nanmedian(by_fold[k])) if np.isfinite(by_fold[k]).any() else float("nan")
                   for k in scored]
        wp = [float(np.mean(well_placed(by_fold[k], threshold=threshold))) if len(by_fold[k])
              else float("nan") for k in scored]
        any_mad = bool(np.isfinite(medians).any())
        row = {"variant": variant}
        row.update({f"median_mad_fold{k}": m for k, m in zip(scored, medians)})
        row["median_mad_mean"] = float(np.nanmean(medians)) if any_mad else float("nan")
        row["median_mad_std"] = float(np.nanstd(medians)) if any_mad else float("nan")
        row.update({f"well_placed_fold{k}": w for k, w in zip(scored, wp)})
        row["well_placed_mean"] = float(np.nanmean(wp))
        row["well_placed_std"] = float(np.nanstd(wp))  # ddof 0, as upstream
        row["n"] = int(sum(len(by_fold[k]) for k in scored))
        row["n_with_mad"] = int(sum(np.isfinite(by_fold[k]).sum() for k in scored))
        row["folds_scored"] = len(scored)
        rows.append(row)
    return rows


def format_tables(det_rows: list[dict], place_rows: list[dict], *, upstream_mad: bool) -> str:
    """Upstream-style summary: detection and well-placed rates, mean ± std over folds."""
    wp = {r["variant"]: r for r in place_rows}
    lines = ["landmark detection and placement (mean ± std over folds, % of test images)",
             f"{'image':<13}{'detected':>16}{'well placed':>16}{'median MAD %IOD':>18}{'n':>6}{'folds':>7}"]
    for r in det_rows:
        p = wp.get(r["variant"])
        well = f"{100 * p['well_placed_mean']:.1f} ± {100 * p['well_placed_std']:.1f}" if p else "-"
        mad = f"{p['median_mad_mean']:.2f}" if p else "-"
        lines.append(f"{r['variant']:<13}{100 * r['mean']:>9.1f} ± {100 * r['std']:<4.1f}{well:>16}{mad:>18}"
                     f"{r['n']:>6}{r['folds_scored']:>7}")
    lines.append(f"MAD divisor: {'468 (upstream)' if upstream_mad else 'number of landmarks (478)'}; "
                 f"well placed = MAD < {WELL_PLACED_MAD:g} % of the CT inter-ocular distance")
    return "\n".join(lines)
