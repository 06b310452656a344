"""MediaPipe face-mesh topology for the digital mask, and the mesh type every backend returns.

A backend turns a 224x224 prep image and its MediaPipe landmarks into a 3D face
mesh in *image geometry*: vertex columns are (x = image column px, y = image row
px, depth px towards the viewer).

Triangles are the 3-cliques of MediaPipe's FACEMESH_TESSELATION edge graph (854),
minus the two cliques that are not faces (their three edges already border two faces
each; 852 left, the Euler count for a disc with three holes), plus fans that close
the holes: each eye to its iris centre (landmarks 468/473), the mouth to an added
vertex at the inner-lip centroid, so no eye or mouth of the photo shows through.
Windings are made consistent over the mesh (trimesh), then flipped so the face looks
at the viewer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from faceaudit.core.contracts import N_LANDMARKS
from faceaudit.mask.headpose import landmarks_to_viewer

N_MESH_VERTICES = N_LANDMARKS + 1  # the landmarks + the mouth-fill centre
MOUTH_CENTRE = N_LANDMARKS


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


@functools.lru_cache(maxsize=1)
def triangles_and_loops() -> tuple[np.ndarray, tuple[tuple[int, ...], ...]]:
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
            nxt = next(v for v in nbr[cur] if v != prev)
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

    tris, loops = triangles_and_loops()
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
    return append_mouth_centre(flip_y(landmarks_to_viewer(landmarks, width, height)))


def append_mouth_centre(verts: np.ndarray) -> np.ndarray:
    _, loops = triangles_and_loops()
    mouth = next(loop for loop in loops if 10 not in loop and 33 not in loop and 263 not in loop)
    return np.concatenate([verts[:N_LANDMARKS], verts[list(mouth)].mean(0, keepdims=True)])

