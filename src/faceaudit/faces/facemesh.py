"""MediaPipe 0.10.14 face mesh (legacy ``solutions`` API): 478 landmarks per face.

Landmarks are returned as a (478, 3) float array in MediaPipe's normalised
convention: x and y in [0, 1] of the image width and height, z a relative depth
on roughly the same scale as x (negative towards the camera). 468 face points
plus 10 iris points (``refine_landmarks=True``).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import sys
import threading

import numpy as np

from faceaudit.core.contracts import N_FACE_LANDMARKS, N_LANDMARKS  # noqa: F401  (re-exported)

#: MediaPipe modules its ``import`` executes that faceaudit never uses: the drawing helpers
#: import matplotlib.pyplot, and the tasks API its audio, text and vision models (together
#: 0.7 of the 0.95 s that ``import mediapipe`` took). They are loaded on first use instead.
LAZY_MEDIAPIPE_MODULES = frozenset({
    "mediapipe.python.solutions.drawing_utils",
    "mediapipe.python.solutions.drawing_styles",
    "mediapipe.tasks.python",
})


class _LazyModuleFinder(importlib.abc.MetaPathFinder):
    """Finds ``names`` as the path finder does, with a loader that runs a module on first use."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def find_spec(self, name, path, target=None):
        if name not in self.names:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = importlib.util.LazyLoader(spec.loader)
        return spec


_IMPORT_LOCK = threading.Lock()


def mediapipe_solutions():
    """``mediapipe.solutions`` (the legacy API that bundles its models in 0.10.14).

    The modules of ``LAZY_MEDIAPIPE_MODULES`` are imported lazily: an attribute read runs
    them, so ``mp.solutions.drawing_utils`` and ``mp.tasks`` still work, and a process that
    only places landmarks never pays for matplotlib.

    MediaPipe calls a protobuf function that protobuf 4 deprecates, once per image; the
    warning says nothing a user can act on, so it is silenced here, for that message only.
    """
    import warnings

    warnings.filterwarnings("ignore", message="SymbolDatabase.GetPrototype", category=UserWarning)
    with _IMPORT_LOCK:
        if "mediapipe" in sys.modules:
            import mediapipe as mp
        else:
            finder = _LazyModuleFinder(LAZY_MEDIAPIPE_MODULES)
            sys.meta_path.insert(0, finder)
            try:
                import mediapipe as mp
            finally:
                sys.meta_path.remove(finder)
    return mp.solutions


#: Lines MediaPipe's C++ side writes to stderr on every first inference of a graph, which
#: say nothing a user can act on (TFLite picking its CPU delegate, absl's logging not being
#: set up, a feedback-tensor feature the bundled models do not use).
MEDIAPIPE_CHATTER = re.compile(
    rb"^INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.\s*$"
    rb"|^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR\s*$"
    rb"|inference_feedback_manager\.cc:\d+\] Feedback manager requires a model with a single "
    rb"signature inference\. Disabling support for feedback tensors\.\s*$")


def filter_stderr(noise: re.Pattern = MEDIAPIPE_CHATTER):
    """Route this process's standard error (file descriptor 2, so C++ code's writes too)
    through a thread that drops the whole lines matching ``noise``; everything else reaches
    the real stderr. Returns ``stop()``, which puts fd 2 back and writes what is left.

    For a process of its own, such as stage 1's face checker: a line reaches the terminal
    only once its newline is written, so a progress bar that redraws one line would wait.
    """
    real = os.dup(2)
    restore = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, "rb", buffering=0) as source, os.fdopen(real, "wb", buffering=0) as sink:
            pending = b""
            while chunk := source.read(1 << 16):
                *lines, pending = (pending + chunk).split(b"\n")
                kept = b"".join(line + b"\n" for line in lines if not noise.search(line))
                try:
                    if kept:
                        sink.write(kept)
                except OSError:          # the terminal is gone: keep draining, or writers block
                    pass
            if pending and not noise.search(pending):
                try:
                    sink.write(pending)
                except OSError:
                    pass

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()

    def stop() -> None:
        sys.stderr.flush()
        os.dup2(restore, 2)              # closes the pipe's last write end: the pump sees its end
        os.close(restore)
        thread.join(timeout=5)

    return stop


def _connection_indices(connections) -> np.ndarray:
    return np.array(sorted({i for edge in connections for i in edge}), dtype=np.int64)


def eye_contour_indices() -> tuple[np.ndarray, np.ndarray]:
    """Landmark indices of the subject's left and right eye contours (MediaPipe's sets)."""
    fm = mediapipe_solutions().face_mesh
    return _connection_indices(fm.FACEMESH_LEFT_EYE), _connection_indices(fm.FACEMESH_RIGHT_EYE)


def tesselation_edges() -> np.ndarray:
    """(E, 2) edges of MediaPipe's face-mesh tesselation."""
    return np.array(sorted(mediapipe_solutions().face_mesh.FACEMESH_TESSELATION), dtype=np.int64)


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Grey (H, W) or RGB uint8 / float [0, 1] -> contiguous RGB uint8, as MediaPipe wants."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        if not np.issubdtype(image.dtype, np.floating):
            raise TypeError(f"expected uint8 or float [0, 1] pixels, got {image.dtype}")
        image = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected a grey (H, W) or RGB (H, W, 3) image, got shape {image.shape}")
    return np.ascontiguousarray(image[:, :, :3])


class FaceMesh:
    """One face, static images, refined landmarks (the upstream settings).

    Use as a context manager, or call ``close()``. Not shareable across processes:
    build one per worker.
    """

    def __init__(self, *, min_detection_confidence: float = 0.5, max_num_faces: int = 1,
                 refine_landmarks: bool = True) -> None:
        self._mesh = mediapipe_solutions().face_mesh.FaceMesh(
            static_image_mode=True, max_num_faces=max_num_faces,
            refine_landmarks=refine_landmarks, min_detection_confidence=min_detection_confidence)

    def detect(self, image: np.ndarray) -> np.ndarray | None:
        """(478, 3) normalised landmarks of the first face, or None when no face is found."""
        faces = self.detect_all(image)
        return faces[0] if faces else None

    def detect_all(self, image: np.ndarray) -> list[np.ndarray]:
        result = self._mesh.process(as_rgb_uint8(image))
        if not result.multi_face_landmarks:
            return []
        return [np.array([(p.x, p.y, p.z) for p in face.landmark], dtype=np.float64)
                for face in result.multi_face_landmarks]

    def close(self) -> None:
        self._mesh.close()

    def __enter__(self) -> "FaceMesh":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
