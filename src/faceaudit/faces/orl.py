"""The bundled ORL faces (AT&T "Database of Faces": 40 people x 10 grey 92x112 photos).

One place for where they are and how they are read for MediaPipe, so the model check
(``faceaudit.models``), the population mean shape and the simulated cohort's face shapes
all read the same photos the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path

import numpy as np

#: ORL photos are small (92x112): MediaPipe finds their faces only when upscaled 3x
ORL_UPSCALE = 3


def orl_root() -> Path:
    """Folder of the bundled ORL faces: ``s1`` ... ``s40``, each holding ``1.pgm`` ... ``10.pgm``."""
    return Path(str(resources.files("faceaudit") / "data" / "orl_faces"))


def orl_photo(subject: int, photo: int) -> Path:
    """Path of photo ``photo`` (1-10) of person ``subject`` (1-40)."""
    return orl_root() / f"s{subject}" / f"{photo}.pgm"


def orl_people(root: Path | None = None) -> list[Path]:
    """The person folders ``s1`` ... ``sN``, in numeric order."""
    root = orl_root() if root is None else Path(root)
    return sorted((p for p in root.glob("s*") if p.is_dir()), key=lambda p: int(p.name[1:]))


def orl_photos(person: Path) -> list[Path]:
    """A person's photos, in numeric order (1.pgm ... 10.pgm)."""
    return sorted(Path(person).glob("*.pgm"), key=lambda p: int(p.stem))


def upscaled_grey(path: Path, upscale: int = ORL_UPSCALE) -> np.ndarray:
    """A grey photo as uint8, each pixel repeated ``upscale`` x ``upscale`` times (H*u, W*u)."""
    from faceaudit.core.images import read_grey, to_uint8

    grey = to_uint8(read_grey(path))
    return np.kron(grey, np.ones((upscale, upscale), np.uint8))


def mesh_landmarks(paths: Iterable[Path], *, upscale: int = ORL_UPSCALE
                   ) -> Iterator[tuple[Path, np.ndarray | None, int, int]]:
    """MediaPipe landmarks of each photo, upscaled, through one face mesh.

    Yields (path, (478, 3) normalised landmarks or None when no face was found, width,
    height of the upscaled image), in the order of ``paths``.
    """
    from faceaudit.faces.facemesh import FaceMesh

    with FaceMesh() as mesh:
        for path in paths:
            up = upscaled_grey(path, upscale)
            yield Path(path), mesh.detect(up), up.shape[1], up.shape[0]
