"""From a canonical volume (axis 0 superior, 1 posterior, 2 left; see volumes.py) to the
skin surface of the head: threshold, body component, head crop, hole filling,
marching cubes, Laplacian smoothing.

Thresholds
----------
CT  ``"otsu"`` (upstream): Otsu over the whole volume, air vs tissue. Computed on a strided
    sample of at most 2 M voxels (the histogram of 52 M float64 voxels was 3 s of the
    upstream 6.6 s); the value differs from the full-volume Otsu by a fraction of a bin.
    A number = a fixed level in HU (e.g. -300), for CTs whose Otsu level is pulled by bone.
PET ``"percentile"`` (upstream): 95th percentile of the whole volume, background included;
    it moves with field of view and tumour burden.
    ``"adaptive"`` (default): half of the body's median uptake. The body region is found by
    Otsu on log(SUV) of the positive voxels (air vs tissue is a clean split on a log scale);
    the median of that region is the typical soft-tissue uptake, which neither the air
    around the patient (field of view) nor a few hot lesions or the brain (tumour burden)
    move much. Half of it is the half-maximum of the blurred skin edge, i.e. where the
    skin is.

Body, not table
---------------
Components (26-connected, cc3d) are scored by their *core volume*: the volume of voxels
deeper than ``core_radius_mm`` inside the component, measured on a coarse grid. A scanner
table or a mattress is a thin shell (a few mm to 2 cm), so its core is ~0 however many
voxels it has; the patient's body has the largest core.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from faceaudit.stageio import InputError

CT_THRESHOLDS = ("otsu",)
PET_THRESHOLDS = ("adaptive", "percentile")


def _strided_sample(values: np.ndarray, max_samples: int) -> np.ndarray:
    flat = values.reshape(-1)
    step = max(1, int(np.ceil(flat.size / max_samples)))
    return flat[::step]


def otsu_threshold(values: np.ndarray, *, max_samples: int = 2_000_000, bins: int = 256) -> float:
    """Otsu level of ``values`` (any shape) from a deterministic strided sample."""
    from skimage.filters import threshold_otsu

    sample = _strided_sample(np.asarray(values), max_samples).astype(np.float32, copy=False)
    if sample.min() == sample.max():
        raise InputError(f"cannot threshold a constant volume (every voxel {sample.min()})")
    return float(threshold_otsu(sample, nbins=bins))


def ct_threshold(ct: np.ndarray, *, method: str | float = "otsu") -> float:
    """Skin level of a CT (HU): ``"otsu"`` or a fixed number (HU)."""
    if isinstance(method, str):
        if method == "otsu":
            return otsu_threshold(ct)
        try:
            return float(method)
        except ValueError:
            raise InputError(f"CT threshold must be 'otsu' or a number of HU, got {method!r}") from None
    return float(method)


def pet_threshold(suv: np.ndarray, *, method: str = "adaptive", percentile: float = 95.0,
                  body_fraction: float = 0.5) -> float:
    """Skin level of a PET (SUV). See the module docstring for the two methods."""
    if method == "percentile":
        sample = _strided_sample(suv, 4_000_000)
        return float(np.percentile(sample, percentile))
    if method != "adaptive":
        raise InputError(f"PET threshold must be one of {PET_THRESHOLDS}, got {method!r}")
    sample = _strided_sample(suv, 4_000_000).astype(np.float32, copy=False)
    positive = sample[sample > 0]
    if positive.size < 100:
        raise InputError(f"PET has only {positive.size} positive voxels in a sample of {sample.size}")
    log_values = np.log(positive)
    body = positive[log_values > otsu_threshold(log_values)]
    if body.size == 0:
        raise InputError("PET: no voxel above the air/tissue Otsu level")
    return float(body_fraction * np.median(body))


@dataclass
class BodySelection:
    """The chosen component: its label volume crop and how the choice was made."""

    mask: np.ndarray           # (nz, ny, nx) bool, full grid
    label: int
    n_components: int
    candidates: list[dict] = field(default_factory=list)   # per scored label: voxels, core_ml


def _core_volume_ml(component: np.ndarray, spacing, *, core_radius_mm: float, grid_mm: float) -> float:
    from scipy.ndimage import distance_transform_edt

    strides = [max(1, int(round(grid_mm / s))) for s in spacing]
    coarse = component[:: strides[0], :: strides[1], :: strides[2]]
    if not coarse.any():
        return 0.0
    coarse = np.pad(coarse, 1)
    sampling = [s * st for s, st in zip(spacing, strides)]
    depth = distance_transform_edt(coarse, sampling=sampling)
    return float(np.count_nonzero(depth > core_radius_mm) * np.prod(sampling) / 1000.0)


def select_body_component(mask: np.ndarray, spacing, *, core_radius_mm: float = 10.0,
                          grid_mm: float = 5.0, max_candidates: int = 4,
                          min_fraction: float = 0.05) -> BodySelection:
    """Keep the 26-connected component of ``mask`` that is the body (largest core), not a table.

    mask: (nz, ny, nx) bool; spacing: (sz, sy, sx) mm. Components with at least
    ``min_fraction`` of the largest one's voxels (at most ``max_candidates``) are scored.
    """
    import cc3d

    labels, n = cc3d.connected_components(mask, connectivity=26, return_N=True)
    if n == 0:
        raise InputError("no voxel above the skin threshold")
    stats = cc3d.statistics(labels)
    counts = np.asarray(stats["voxel_counts"])
    counts[0] = 0
    order = np.argsort(counts)[::-1]
    order = [int(lab) for lab in order[:max_candidates]
             if counts[lab] > 0 and counts[lab] >= min_fraction * counts[order[0]]]
    candidates = []
    if len(order) == 1:
        best = order[0]
        candidates.append({"label": best, "voxels": int(counts[best]), "core_ml": None})
    else:
        for lab in order:
            box = stats["bounding_boxes"][lab]
            component = labels[box] == lab
            core = _core_volume_ml(component, spacing, core_radius_mm=core_radius_mm, grid_mm=grid_mm)
            candidates.append({"label": lab, "voxels": int(counts[lab]), "core_ml": core})
        best = max(candidates, key=lambda c: (c["core_ml"], c["voxels"]))["label"]
    return BodySelection(mask=labels == best, label=best, n_components=int(n), candidates=candidates)


def head_crop_slices(body: np.ndarray, spacing, *, head_height_mm: float = 240.0) -> tuple[slice, slice, slice]:
    """Bounding slices of the head: from the top of the body (highest axis-0 index holding
    a body voxel) down ``head_height_mm``; in-plane, the body's extent within those slices."""
    z_any = np.flatnonzero(body.any(axis=(1, 2)))
    if z_any.size == 0:
        raise InputError("the body mask is empty; nothing to crop")
    top = int(z_any[-1])
    n_slices = int(np.ceil(head_height_mm / spacing[0]))
    z0 = max(0, top + 1 - n_slices)
    head = body[z0: top + 1]
    y_any = np.flatnonzero(head.any(axis=(0, 2)))
    x_any = np.flatnonzero(head.any(axis=(0, 1)))
    return (slice(z0, top + 1), slice(int(y_any[0]), int(y_any[-1]) + 1),
            slice(int(x_any[0]), int(x_any[-1]) + 1))


def mask_to_mesh(mask: np.ndarray, spacing, *, offset_mm=(0.0, 0.0, 0.0), level: float = 0.5,
                 smoothing_iterations: int = 5, smoothing_lambda: float = 0.5,
                 volume_constraint: bool = True):
    """Marching cubes (Lewiner, ``level``, voxel spacing) + Laplacian smoothing -> trimesh.Trimesh.

    mask: (nz, ny, nx) in the canonical frame; spacing (sz, sy, sx) mm; offset_mm = LPS
    (x, y, z) of voxel [0, 0, 0]. The mask is padded by one empty voxel so the surface
    closes at the crop planes. Vertices are LPS world mm (x left, y posterior, z superior),
    faces wound so that normals point out of the body.

    Smoothing: ``smoothing_iterations`` Laplacian steps of ``smoothing_lambda`` (Open3D's
    upstream defaults: 5 x 0.5). ``volume_constraint`` rescales after each step to keep the
    enclosed volume (trimesh), which removes the Laplacian shrinkage: the area of a voxelised
    ellipsoid is then within 0.2 % of the analytic one (-0.4 .. -1.6 % without).
    """
    import trimesh
    from skimage.measure import marching_cubes

    padded = np.pad(np.asarray(mask, dtype=np.float32), 1)
    if padded.max() <= level:
        raise InputError("the head mask is empty; no surface to extract")
    verts, faces, _normals, _values = marching_cubes(padded, level, spacing=tuple(spacing),
                                                     method="lewiner")
    # array axes (z, y, x) -> world (x, y, z); undo the padding voxel
    verts = verts[:, ::-1] - np.asarray(spacing, dtype=np.float64)[::-1] + np.asarray(offset_mm)
    # Lewiner's winding in (z, y, x) becomes outward once the axes are swapped to (x, y, z)
    mesh = trimesh.Trimesh(vertices=verts, faces=faces, process=False)
    if smoothing_iterations > 0:
        from trimesh.smoothing import filter_laplacian

        filter_laplacian(mesh, lamb=smoothing_lambda, iterations=smoothing_iterations,
                         volume_constraint=volume_constraint)
    return mesh


@dataclass
class HeadSurface:
    """What ``extract_head_surface`` found: mesh (LPS mm) and the numbers behind it."""

    mesh: object
    threshold: float
    n_components: int
    body_voxels: int
    crop: tuple[slice, slice, slice]
    timings: dict[str, float]
    candidates: list[dict]


def extract_head_surface(array: np.ndarray, spacing, *, modality: str, origin=(0.0, 0.0, 0.0),
                         ct_threshold_method: str | float = "otsu",
                         pet_threshold_method: str = "adaptive", pet_percentile: float = 95.0,
                         pet_body_fraction: float = 0.5, head_height_mm: float = 240.0,
                         fill_holes: bool = True, smoothing_iterations: int = 5,
                         core_radius_mm: float = 10.0) -> HeadSurface:
    """Canonical volume (nz, ny, nx) with spacing (sz, sy, sx) mm -> head skin mesh.

    modality: "ct" (HU) or "pet" (SUV). Raises InputError when no surface can be made.
    """
    from scipy.ndimage import binary_fill_holes

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if modality == "ct":
        level = ct_threshold(array, method=ct_threshold_method)
        binary = array >= level
    elif modality == "pet":
        level = pet_threshold(array, method=pet_threshold_method, percentile=pet_percentile,
                              body_fraction=pet_body_fraction)
        binary = array > level
    else:
        raise ValueError(f"modality must be 'ct' or 'pet', got {modality!r}")
    timings["threshold"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    body = select_body_component(binary, spacing, core_radius_mm=core_radius_mm)
    del binary
    timings["components"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    crop = head_crop_slices(body.mask, spacing, head_height_mm=head_height_mm)
    head = body.mask[crop]
    body_voxels = int(np.count_nonzero(head))
    if fill_holes:
        head = binary_fill_holes(head)
    timings["crop_fill"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    start = [c.start for c in crop]                       # (z, y, x) index
    offset = np.asarray(origin, dtype=np.float64) + np.asarray(start[::-1]) * np.asarray(spacing)[::-1]
    mesh = mask_to_mesh(head, spacing, offset_mm=offset, smoothing_iterations=smoothing_iterations)
    timings["surface"] = time.perf_counter() - t0
    return HeadSurface(mesh=mesh, threshold=level, n_components=body.n_components,
                       body_voxels=body_voxels, crop=crop, timings=timings,
                       candidates=body.candidates)
