"""The mask renderer, the forehead band, the face cut and the composed images.

The renderer draws an image-geometry mesh (see :mod:`faceaudit.mask.topology`) as an
untextured grey surface (albedo 0.65, three point lights as the upstream OpenDR
renderer) with an orthographic camera covering exactly the image, so the mask sits
where the face is. The result is cut to the face region: the convex hull of
MediaPipe's face-oval landmarks, its upper part pushed up to take in the forehead
(upstream used the hull of dlib's 81 points, forehead included). A mask that covers
too little of the cut raises :class:`~faceaudit.mask.topology.MaskError`; callers
record it as failed and never pass the photo on unmasked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from faceaudit.mask.topology import MaskError, orient_faces, triangles_and_loops

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


@dataclass
class MaskImages:
    """The three uint8 RGB variants (H, W, 3) and the boolean masks behind them."""

    overlay: np.ndarray
    mask_only: np.ndarray
    mask_only_black: np.ndarray
    cut: np.ndarray       # (H, W) bool: face region
    covered: np.ndarray   # (H, W) bool: rendered mesh inside the cut
    render: np.ndarray    # (H, W, 3) uint8: the full render on white



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

    _, loops = triangles_and_loops()
    oval = next(loop for loop in loops if 10 in loop)
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
