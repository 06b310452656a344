"""Frontal render of a head mesh in the canonical LPS frame (x left, y posterior, z superior).

The camera looks at the face from the anterior side (along +y), image up = superior,
image right = the patient's left (as when facing the patient). It is placed from the
mesh's physical extent, never from grid indices: the head's x/z bounding box is
scaled to ``head_px`` pixels and centred in the ``size`` x ``size`` image.

Projection: orthographic by default. The upstream pinhole (90 degree fov, eye at a fixed
voxel position) made the face size depend on the grid; an orthographic view keeps a
fixed mm-per-pixel for a given head size and has no perspective distortion.
``projection="pinhole"`` puts a pinhole ``distance_mm`` in front of the face with the
fov that fits the same head box.

The default ``head_px=RENDER_CROP`` (208) puts the whole head inside the central crop the
upstream denoiser and landmark steps take from the ``RENDER_SIZE`` (512) square renders.

Shading ``"normals"`` (upstream): grey = rgb2gray(|n|) = 0.2125 |nx| + 0.7154 |ny| +
0.0721 |nz| of the hit face's unit normal, y being the viewing axis as upstream.
``"lambert"``: |n . view| (a headlight). Missed rays are black (0).
Rays are cast by Embree (embreex, ``first_hits``); a pure-Python tracer is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from faceaudit.core.contracts import RENDER_CROP, RENDER_SIZE

#: skimage.color.rgb2gray weights, applied to |normal| as upstream did.
LUMINANCE = np.array([0.2125, 0.7154, 0.0721])
SHADINGS = ("normals", "lambert")
PROJECTIONS = ("orthographic", "pinhole")


@dataclass
class Render:
    """image: (size, size) uint8, black background; depth: (size, size) float32 mm from the
    image plane (orthographic) or the eye (pinhole), NaN where no surface; hit: bool mask."""

    image: np.ndarray
    depth: np.ndarray
    hit: np.ndarray
    camera: dict


def first_hits(mesh, origins: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Index of the first face of ``mesh`` (SurfaceMesh, mm) each ray meets, -1 where none.

    origins, directions: (n, 3) mm and unit vectors. Cast by Embree (embreex), which works in
    float32: the scene is first shifted to the mesh's lowest corner and scaled to a diagonal
    of 100 units (trimesh's conditioning, so renders made through trimesh stay the same), or
    float32 would round away the fraction of a millimetre that the face's relief lives in.
    """
    try:
        from embreex import rtcore_scene
        from embreex.mesh_construction import TriangleMesh
    except ImportError:
        raise RuntimeError("Embree (embreex) is not available; refusing a pure-Python ray tracer") from None
    lo, hi = mesh.bounds
    diagonal = float(((hi - lo) ** 2).sum() ** 0.5)
    scale = 100.0 / diagonal if diagonal > 0 else 1.0
    scene = rtcore_scene.EmbreeScene()
    TriangleMesh(scene=scene, vertices=((mesh.vertices - lo) * scale).astype(np.float32),
                 indices=mesh.faces.astype(np.int32))
    shifted = (np.asarray(origins, dtype=np.float32).astype(np.float64) - lo) * scale
    directions = np.asarray(directions, dtype=np.float32)
    lengths = np.sqrt((directions * directions) @ np.ones(3))
    unit = directions * (1.0 / np.where(lengths > 0, lengths, 1.0))[:, None]
    return scene.run(shifted.astype(np.float32), unit.astype(np.float32))


def camera_rays(bounds: np.ndarray, *, size: int = RENDER_SIZE, head_px: int = RENDER_CROP,
                projection: str = "orthographic", distance_mm: float = 600.0):
    """Ray origins and unit directions (size*size, 3), row-major, for a frontal view of ``bounds``.

    bounds: (2, 3) LPS min/max corners of the head mesh in mm.
    """
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    lo, hi = np.asarray(bounds, dtype=np.float64)
    centre_x, centre_z = (lo[0] + hi[0]) / 2.0, (lo[2] + hi[2]) / 2.0
    extent = max(hi[0] - lo[0], hi[2] - lo[2])
    mm_per_px = extent / float(head_px)
    # pixel centres: column -> +x (patient's left on the viewer's right), row -> -z (down)
    offsets = (np.arange(size) + 0.5 - size / 2.0) * mm_per_px
    grid_x = centre_x + offsets[None, :].repeat(size, 0)
    grid_z = centre_z - offsets[:, None].repeat(size, 1)
    front = lo[1] - 10.0                     # 10 mm anterior of the nose tip
    camera = {"projection": projection, "mm_per_px_at_face": mm_per_px, "size": size,
              "head_px": head_px, "centre_xz_mm": [centre_x, centre_z], "image_plane_y_mm": front}
    if projection == "orthographic":
        origins = np.stack([grid_x, np.full_like(grid_x, front), grid_z], -1).reshape(-1, 3)
        directions = np.tile([0.0, 1.0, 0.0], (origins.shape[0], 1))
    else:
        eye = np.array([centre_x, front - distance_mm, centre_z])
        targets = np.stack([grid_x, np.full_like(grid_x, front), grid_z], -1).reshape(-1, 3)
        directions = targets - eye
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        origins = np.tile(eye, (directions.shape[0], 1))
        half = np.degrees(np.arctan((size / 2.0) * mm_per_px / distance_mm))
        camera.update({"eye_mm": eye.tolist(), "fov_deg": 2.0 * half})
    return origins, directions, camera


def render_frontal(mesh, *, size: int = RENDER_SIZE, head_px: int = RENDER_CROP, shading: str = "normals",
                   projection: str = "orthographic", distance_mm: float = 600.0) -> Render:
    """Render ``mesh`` (SurfaceMesh or trimesh.Trimesh, LPS mm) from the front. See the module
    docstring."""
    if shading not in SHADINGS:
        raise ValueError(f"shading must be one of {SHADINGS}, got {shading!r}")
    origins, directions, camera = camera_rays(mesh.bounds, size=size, head_px=head_px,
                                              projection=projection, distance_mm=distance_mm)
    tri = first_hits(mesh, origins, directions)
    hit = tri >= 0
    normals = np.asarray(mesh.face_normals)[tri[hit]]
    if shading == "normals":
        grey = np.abs(normals) @ LUMINANCE
    else:
        grey = np.abs(np.einsum("ij,ij->i", normals, directions[hit]))
    image = np.zeros(size * size, dtype=np.float64)
    image[hit] = grey
    # depth along the ray: plane of the hit triangle, t = n.(v0 - o) / n.d
    v0 = np.asarray(mesh.vertices)[np.asarray(mesh.faces)[tri[hit], 0]]
    denom = np.einsum("ij,ij->i", normals, directions[hit])
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.einsum("ij,ij->i", normals, v0 - origins[hit]) / denom
    depth = np.full(size * size, np.nan, dtype=np.float32)
    depth[hit] = t
    image_u8 = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8).reshape(size, size)
    return Render(image=image_u8, depth=depth.reshape(size, size), hit=hit.reshape(size, size),
                  camera=camera)
