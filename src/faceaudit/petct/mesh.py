"""The head surface as arrays: vertices, faces and what stage 1 needs of them.

Stage 1 makes, renders and saves a mesh per volume without trimesh: importing trimesh costs
about 0.5 s per process (it pulls in scipy.spatial, scipy.optimize and networkx), a fifth
of reading an AutoPET study. ``SurfaceMesh.to_trimesh`` hands the same surface to trimesh
for anything else (watertightness, repairs, other export formats).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

#: a face whose edge cross product is shorter than this (mm^2) has no normal (zero vector)
DEGENERATE_AREA = 1e-13


def signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    """Volume (mm^3) enclosed by triangles ``faces`` (F, 3) of ``vertices`` (V, 3), by the
    divergence theorem: positive when the faces are wound with normals pointing out."""
    v0, v1, v2 = (vertices[faces[:, k]] for k in range(3))
    return float(np.einsum("ij,ij->i", v0, np.cross(v1, v2)).sum() / 6.0)


@dataclass(frozen=True, eq=False)
class SurfaceMesh:
    """A triangle surface in LPS mm.

    vertices: (V, 3) float64, world x (left), y (posterior), z (superior) in mm.
    faces: (F, 3) int64 vertex indices, wound so that normals point out of the body.
    """

    vertices: np.ndarray
    faces: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "vertices", np.asarray(self.vertices, dtype=np.float64))
        object.__setattr__(self, "faces", np.asarray(self.faces, dtype=np.int64))

    @functools.cached_property
    def bounds(self) -> np.ndarray:
        """(2, 3): the lowest and highest x, y, z (mm)."""
        return np.array([self.vertices.min(axis=0), self.vertices.max(axis=0)])

    @functools.cached_property
    def _edge_cross(self) -> np.ndarray:
        """(F, 3): cross product of each face's first and second edge (twice its area vector)."""
        corners = self.vertices[self.faces]
        edges = corners[:, 1:] - corners[:, :2]
        return np.cross(edges[:, 0], edges[:, 1])

    @functools.cached_property
    def _doubled_areas(self) -> np.ndarray:
        crossed = self._edge_cross
        return np.sqrt((crossed * crossed) @ np.ones(3))

    @functools.cached_property
    def face_normals(self) -> np.ndarray:
        """(F, 3) outward unit normals; a zero vector for a degenerate face."""
        lengths = self._doubled_areas
        valid = lengths > DEGENERATE_AREA
        normals = np.zeros_like(self._edge_cross)
        normals[valid] = self._edge_cross[valid] * (1.0 / lengths[valid])[:, None]
        return normals

    @property
    def area(self) -> float:
        """Surface area (mm^2)."""
        return float(self._doubled_areas.sum() / 2.0)

    @property
    def volume(self) -> float:
        """Enclosed volume (mm^3) by the divergence theorem; positive when normals point out."""
        return signed_volume(self.vertices, self.faces)

    def to_trimesh(self):
        """The same surface as a ``trimesh.Trimesh`` (imports trimesh)."""
        import trimesh

        return trimesh.Trimesh(vertices=self.vertices, faces=self.faces, process=False)

    def ply_bytes(self) -> bytes:
        """Binary little-endian PLY: float32 x, y, z per vertex and a uchar-counted int list
        per face, the layout trimesh and most viewers read and write."""
        header = (f"ply\nformat binary_little_endian 1.0\ncomment faceaudit head surface, LPS mm\n"
                  f"element vertex {len(self.vertices)}\nproperty float x\nproperty float y\nproperty float z\n"
                  f"element face {len(self.faces)}\nproperty list uchar int vertex_indices\nend_header\n")
        faces = np.empty(len(self.faces), dtype=[("count", "u1"), ("indices", "<i4", (3,))])
        faces["count"] = 3
        faces["indices"] = self.faces
        return header.encode("ascii") + self.vertices.astype("<f4").tobytes() + faces.tobytes()
