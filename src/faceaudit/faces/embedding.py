"""Face embeddings behind one interface: ``embed(rgb uint8 (H, W, 3)) -> EmbeddingResult``.

Backends
--------
``dlib`` (default, offline)
    dlib's ResNet 128-D model and 5-point shape predictor, shipped as data files in
    the ``face-recognition-models`` wheel. Face box: dlib's HOG frontal detector,
    first on the image as given, then upsampled (small crops such as ORL's 92x112
    need it); if HOG finds nothing, the highest-scoring RetinaFace box
    (``faceaudit.faces.facedetect``, score >= ``min_det_score``) is handed to the shape
    predictor instead. Masks rendered from a 3-D face often defeat HOG but not
    RetinaFace, and a mask that *no* detector finds is a miss, never dropped.
``insightface``
    A ``buffalo_l``-style pack (``det_10g.onnx`` SCRFD detector + ``w600k_r50.onnx``
    ArcFace) from a folder the user gives, with ``FaceAnalysis`` semantics: BGR
    input as cv2 reads it, det size 640x640, det threshold 0.5, the highest-scoring
    face, 5-point ``norm_crop`` alignment, the raw 512-D embedding. The recognizer's
    input normalisation is set, never guessed: ``input_mean``/``input_std`` when given,
    else the model zoo's (x - 127.5) / 127.5.
``arcface-onnx``
    Any ArcFace-style ONNX with a square (112x112) input from a folder or file the
    user gives; five keypoints from our RetinaFace, ``norm_crop`` alignment; the input
    normalisation from the option, a sidecar JSON, an explicit graph rule or the zoo
    default, in that order (:mod:`faceaudit.faces.arcface`).

``mobilefacenet``, ``mobileface``
    ArcFace-family models converted from TensorFlow.js by ``make models`` into the model
    cache (``faceaudit.faces.tfjs_recognizers``): RetinaFace keypoints, ``norm_crop``,
    RGB, the model's own mean/std.

No backend downloads anything: a missing model file is an ``InputError`` naming
the files expected and where they come from (insightface's own loaders would try
to download a missing pack, so files are checked before insightface sees them).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from faceaudit.core.files import InputError, file_digest
from faceaudit.faces.alignment import norm_crop
from faceaudit.faces.arcface import (  # noqa: F401  (read_onnx_model, onnx_signature re-exported)
    ARCFACE_EXPECTED,
    ARCFACE_SIGNATURE,
    ARCFACE_SOURCE,
    ZOO_ARCFACE_MEAN,
    ZOO_ARCFACE_STD,
    ArcFaceRecognizer,
    Normalisation,
    arcface_normalisation,
    check_arcface_signature,
    checked_normalisation,
    onnx_signature,
    read_onnx_model,
)
from faceaudit.faces.facemesh import as_rgb_uint8
from faceaudit.faces.onnx_session import cpu_session_options

BACKENDS = ("dlib", "insightface", "arcface-onnx", "mobilefacenet", "mobileface")
#: converted once by `make models` into the model cache (faceaudit.faces.tfjs_recognizers)
TFJS_BACKENDS = ("mobilefacenet", "mobileface")

#: buffalo_l's detector and recognition files (the pack also holds landmark and
#: gender/age models, which are not needed here).
BUFFALO_DETECTOR = "det_10g.onnx"
BUFFALO_RECOGNITION = "w600k_r50.onnx"
BUFFALO_SOURCE = ("the insightface model zoo: buffalo_l.zip from "
                  "https://github.com/deepinsight/insightface/releases (v0.7), unzipped; "
                  "pretrained weights are for non-commercial research only")
DLIB_MODEL_FILES = ("dlib_face_recognition_resnet_model_v1.dat",
                    "shape_predictor_5_face_landmarks.dat")


@dataclass(frozen=True)
class EmbeddingResult:
    """What one image gave: an embedding, or None and why.

    vector : (D,) float32 raw embedding (not normalised), or None when no face was found.
    det_score : confidence of the face used (detector-specific scale), NaN when none.
    reason : empty when a face was embedded, else why not.
    detector : which detector supplied the face ("hog", "retinaface", "scrfd", "").
    """

    vector: np.ndarray | None
    det_score: float
    reason: str = ""
    detector: str = ""

    @property
    def found(self) -> bool:
        return self.vector is not None


def model_file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a model file, computed once per process for a given file (path, size,
    modification time, inode): describe() is called per worker and per run, and hashing
    a 170 MB pack each time would cost seconds."""
    info = Path(path).stat()
    return _digest_of(str(Path(path).resolve()), info.st_size, info.st_mtime_ns, info.st_ino)


@lru_cache(maxsize=64)
def _digest_of(path: str, size: int, mtime_ns: int, inode: int) -> str:
    return file_digest(path)


# --------------------------------------------------------------------------- dlib


def dlib_model_dir() -> Path:
    """Folder of the dlib model files inside the ``face-recognition-models`` wheel.

    Found with ``find_spec`` rather than an import: the package's ``__init__``
    imports ``pkg_resources``, which recent setuptools no longer ships.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the dlib backend needs the 'face-recognition-models' package "
                         "(pip install face-recognition-models); it is not installed")
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    missing = [name for name in DLIB_MODEL_FILES if not (folder / name).is_file()]
    if missing:
        raise InputError(f"the dlib backend expects {list(DLIB_MODEL_FILES)} in {folder}; "
                         f"missing {missing} (reinstall face-recognition-models)")
    return folder


class DlibEmbedder:
    """dlib ResNet (128-D) on a 5-point-aligned chip; HOG box, RetinaFace box as fallback."""

    name = "dlib"
    dim = 128

    def __init__(self, *, upsample: tuple[int, ...] = (0, 1, 2), hog_threshold: float = 0.0,
                 retinaface_fallback: bool = True, min_det_score: float = 0.5,
                 jitters: int = 0) -> None:
        import dlib

        folder = dlib_model_dir()
        self._detector = dlib.get_frontal_face_detector()
        self._shape = dlib.shape_predictor(str(folder / "shape_predictor_5_face_landmarks.dat"))
        self._model = dlib.face_recognition_model_v1(
            str(folder / "dlib_face_recognition_resnet_model_v1.dat"))
        self.upsample = tuple(int(u) for u in upsample)
        self.hog_threshold = float(hog_threshold)
        self.min_det_score = float(min_det_score)
        self.jitters = int(jitters)
        self._retinaface = None
        self.retinaface_fallback = bool(retinaface_fallback)
        self.model_files = [folder / name for name in DLIB_MODEL_FILES]

    def describe(self) -> dict:
        return {"backend": self.name, "dim": self.dim,
                "model_files": {p.name: model_file_digest(p) for p in self.model_files},
                "upsample": list(self.upsample), "hog_threshold": self.hog_threshold,
                "retinaface_fallback": self.retinaface_fallback,
                "min_det_score": self.min_det_score, "jitters": self.jitters}

    def _box(self, rgb: np.ndarray):
        import dlib

        for up in self.upsample:
            rects, scores, _ = self._detector.run(rgb, up, self.hog_threshold)
            if len(rects):
                best = int(np.argmax(scores))
                return rects[best], float(scores[best]), "hog"
        if self.retinaface_fallback:
            if self._retinaface is None:
                from faceaudit.faces.facedetect import RetinaFaceDetector

                self._retinaface = RetinaFaceDetector(min_score=self.min_det_score)
            faces = self._retinaface.detect(rgb)
            if faces:
                x0, y0, x1, y1 = faces[0].box
                # int(np.rint()): round() of a float32 is a float32 on numpy < 2
                left, top, right, bottom = (int(v) for v in np.rint([x0, y0, x1, y1]))
                return dlib.rectangle(left, top, right, bottom), faces[0].score, "retinaface"
        return None, float("nan"), ""

    def embed(self, image: np.ndarray) -> EmbeddingResult:
        rgb = as_rgb_uint8(image)
        rect, score, detector = self._box(rgb)
        if rect is None:
            tried = f"HOG (upsample {list(self.upsample)})"
            if self.retinaface_fallback:
                tried += f" and RetinaFace (score >= {self.min_det_score:g})"
            return EmbeddingResult(None, float("nan"), f"no face found by {tried}", "")
        shape = self._shape(rgb, rect)
        vector = np.asarray(self._model.compute_face_descriptor(rgb, shape, self.jitters),
                            dtype=np.float32)
        return EmbeddingResult(vector, score, "", detector)


# --------------------------------------------------------------------------- ONNX


def _load_insightface_model(path: Path, *, expected: str = "an ONNX model"):
    """Route an ONNX file through insightface's model zoo, never downloading.

    The file is checked first (:func:`read_onnx_model`), so a misnamed, empty or
    garbage file is an InputError naming it instead of a protobuf traceback.
    """
    from insightface.model_zoo import model_zoo

    read_onnx_model(path, expected=expected)
    try:
        return model_zoo.get_model(str(path), providers=["CPUExecutionProvider"],
                                   sess_options=cpu_session_options(), download=False)
    except Exception as exc:  # ORT InvalidGraph, an op it does not know ...
        raise InputError(f"cannot load {path} as an ONNX model: {exc}; expected {expected}") from exc


def _bgr_or_rgb(rgb: np.ndarray, rgb_to_model: bool) -> np.ndarray:
    # insightface's blobFromImage(swapRB=True) expects BGR, as cv2.imread gives;
    # upstream passed RGB (B7.3): kept as a switch.
    return rgb if rgb_to_model else np.ascontiguousarray(rgb[:, :, ::-1])


class InsightFaceEmbedder:
    """A buffalo_l-style pack: SCRFD detector + ArcFace recognition, FaceAnalysis semantics."""

    name = "insightface"

    def __init__(self, model_dir: str | os.PathLike | None, *, det_size: int = 640,
                 det_thresh: float = 0.5, rgb_to_model: bool = False,
                 input_mean: float | None = None, input_std: float | None = None) -> None:
        given = checked_normalisation(input_mean, input_std,
                                      where="the options (--input_mean, --input_std)")
        self.normalisation = (Normalisation(*given, "option") if given else Normalisation(
            ZOO_ARCFACE_MEAN, ZOO_ARCFACE_STD,
            "default: insightface model-zoo ArcFace (x - 127.5) / 127.5"))
        folder = _require_dir(model_dir, backend=self.name,
                              expected=[BUFFALO_DETECTOR, BUFFALO_RECOGNITION],
                              source=BUFFALO_SOURCE)
        self.detector, self.recognizer = _route_pack(folder)
        self.detector.prepare(-1, input_size=(det_size, det_size), det_thresh=det_thresh)
        self.recognizer.prepare(-1)
        # ArcFaceONNX guessed these from node names; its get_feat reads the attributes
        self.recognizer.input_mean = self.normalisation.mean
        self.recognizer.input_std = self.normalisation.std
        if not getattr(self.detector, "use_kps", False):
            raise InputError(f"the detector {self.detector.model_file} gives no keypoints; "
                             "alignment needs a 5-keypoint SCRFD model such as det_10g.onnx")
        self.model_dir = folder
        self.det_size = int(det_size)
        self.det_thresh = float(det_thresh)
        self.rgb_to_model = bool(rgb_to_model)
        self.dim = int(self.recognizer.output_shape[-1])
        self.model_files = [Path(self.detector.model_file), Path(self.recognizer.model_file)]

    def describe(self) -> dict:
        return {"backend": self.name, "dim": self.dim, "model_dir": str(self.model_dir),
                "model_files": {p.name: model_file_digest(p) for p in self.model_files},
                "det_size": self.det_size, "det_thresh": self.det_thresh,
                "channel_order": "RGB (upstream)" if self.rgb_to_model else "BGR",
                **self.normalisation.describe()}

    def embed(self, image: np.ndarray) -> EmbeddingResult:
        pixels = _bgr_or_rgb(as_rgb_uint8(image), self.rgb_to_model)
        boxes, keypoints = self.detector.detect(pixels, max_num=0)
        if boxes.shape[0] == 0:
            return EmbeddingResult(None, float("nan"),
                                   f"no face found by SCRFD (score >= {self.det_thresh:g})", "")
        best = int(np.argmax(boxes[:, 4]))  # the highest score, not faces[0] (B7.7)
        # what ArcFaceONNX.get(img, face) does, through the warning-free norm_crop
        crop = norm_crop(pixels, keypoints[best], int(self.recognizer.input_size[0]))
        vector = np.asarray(self.recognizer.get_feat(crop), dtype=np.float32).ravel()
        return EmbeddingResult(vector, float(boxes[best, 4]), "", "scrfd")


def _require_dir(model_dir, *, backend: str, expected: list[str], source: str) -> Path:
    hint = f"expected {', '.join(expected)} from {source}"
    if model_dir is None or str(model_dir) == "":
        raise InputError(f"the {backend} backend needs --model_dir: a folder holding {hint}")
    folder = Path(model_dir).expanduser()
    if not folder.is_dir():
        raise InputError(f"--model_dir {folder} is not a folder; the {backend} backend {hint}")
    return folder


def _route_pack(folder: Path):
    """(detector, recognizer) from a pack folder: the buffalo_l names first, else any
    ONNX files insightface routes to 'detection' and 'recognition' (sorted, first wins,
    as FaceAnalysis does)."""
    named = [folder / BUFFALO_DETECTOR, folder / BUFFALO_RECOGNITION]
    candidates = named if all(p.is_file() for p in named) else sorted(folder.glob("*.onnx"))
    models: dict[str, object] = {}
    for path in candidates:
        model = _load_insightface_model(path)
        task = getattr(model, "taskname", None)
        if task in ("detection", "recognition") and task not in models:
            models[task] = model
    missing = [t for t in ("detection", "recognition") if t not in models]
    if missing:
        found = sorted(p.name for p in folder.glob("*.onnx"))
        raise InputError(
            f"{folder} lacks a {' and a '.join(missing)} model: found ONNX files {found}; "
            f"expected {BUFFALO_DETECTOR} (SCRFD detector with keypoints) and "
            f"{BUFFALO_RECOGNITION} (ArcFace) from {BUFFALO_SOURCE}")
    return models["detection"], models["recognition"]


class ArcFaceOnnxEmbedder:
    """Any ArcFace-style ONNX: RetinaFace keypoints, ``norm_crop`` to the model's input size."""

    name = "arcface-onnx"

    def __init__(self, model_path: str | os.PathLike | None, *, min_det_score: float = 0.5,
                 rgb_to_model: bool = False, input_mean: float | None = None,
                 input_std: float | None = None) -> None:
        from faceaudit.faces.facedetect import RetinaFaceDetector

        path = _find_arcface_file(model_path)
        model = read_onnx_model(path, expected=ARCFACE_EXPECTED)   # parsed once, used twice
        check_arcface_signature(path, model)
        self.normalisation = arcface_normalisation(path, model, mean=input_mean, std=input_std)
        try:
            self.recognizer = ArcFaceRecognizer(path, self.normalisation)
        except Exception as exc:  # ORT InvalidGraph, an op it does not know ...
            raise InputError(f"cannot load {path} as an ONNX model: {exc}; "
                             f"expected {ARCFACE_EXPECTED}") from exc
        self.model_path = path
        self.min_det_score = float(min_det_score)
        self.rgb_to_model = bool(rgb_to_model)
        self.dim = int(model.graph.output[0].type.tensor_type.shape.dim[1].dim_value)
        self._detector = RetinaFaceDetector(min_score=self.min_det_score)

    def describe(self) -> dict:
        return {"backend": self.name, "dim": self.dim,
                "model_files": {self.model_path.name: model_file_digest(self.model_path)},
                "input_size": list(self.recognizer.input_size),
                "keypoints": "retinaface", "min_det_score": self.min_det_score,
                "channel_order": "RGB (upstream)" if self.rgb_to_model else "BGR",
                **self.normalisation.describe()}

    def embed(self, image: np.ndarray) -> EmbeddingResult:
        rgb = as_rgb_uint8(image)
        faces = self._detector.detect(rgb)
        if not faces:
            return EmbeddingResult(None, float("nan"), "no face found by RetinaFace "
                                   f"(score >= {self.min_det_score:g})", "")
        face = faces[0]  # highest score first
        crop = norm_crop(_bgr_or_rgb(rgb, self.rgb_to_model), face.keypoints,
                         int(self.recognizer.input_size[0]))
        vector = np.asarray(self.recognizer.get_feat(crop), dtype=np.float32).ravel()
        return EmbeddingResult(vector, float(face.score), "", "retinaface")


def _find_arcface_file(model_path) -> Path:
    if model_path is None or str(model_path) == "":
        raise InputError(f"the arcface-onnx backend needs --model_dir: an .onnx file or a "
                         f"folder holding one; {ARCFACE_SOURCE}")
    path = Path(model_path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise InputError(f"--model_dir {path} is neither an .onnx file nor a folder; "
                         f"expected {ARCFACE_SOURCE}")
    files = sorted(path.glob("*.onnx"))
    if not files:
        raise InputError(f"no .onnx file in {path}; expected {ARCFACE_SOURCE}")
    if len(files) == 1:
        return files[0]
    preferred = path / BUFFALO_RECOGNITION
    if preferred.is_file():
        return preferred
    raise InputError(f"{path} holds several ONNX files {[f.name for f in files]}; "
                     "pass the ArcFace file itself as --model_dir")


# --------------------------------------------------------------------------- factory


def make_embedder(backend: str = "dlib", *, model_dir: str | os.PathLike | None = None,
                  rgb_to_model: bool = False, input_mean: float | None = None,
                  input_std: float | None = None, **options):
    """``dlib`` (default, offline), ``insightface`` (a pack in ``model_dir``) or
    ``arcface-onnx`` (an ONNX file, or a folder holding one, in ``model_dir``), the
    converted ``mobilefacenet`` / ``mobileface``. ``input_mean`` / ``input_std`` set the
    input normalisation of ``insightface`` and ``arcface-onnx`` (the converted models
    carry their own; dlib has none)."""
    if backend == "dlib":
        return DlibEmbedder(**options)
    if backend == "insightface":
        return InsightFaceEmbedder(model_dir, rgb_to_model=rgb_to_model, input_mean=input_mean,
                                   input_std=input_std, **options)
    if backend == "arcface-onnx":
        return ArcFaceOnnxEmbedder(model_dir, rgb_to_model=rgb_to_model, input_mean=input_mean,
                                   input_std=input_std, **options)
    if backend in TFJS_BACKENDS:  # RGB always; model_dir overrides the model cache folder
        from faceaudit.faces.tfjs_recognizers import make_tfjs_embedder

        return make_tfjs_embedder(backend, model_dir=model_dir, **options)
    raise InputError(f"unknown embedding backend {backend!r}; expected one of {BACKENDS}")


def cosine_distances(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """1 - cosine similarity, (Q, D) x (G, D) -> (Q, G); NaN rows stay NaN (no face)."""
    q = np.asarray(queries, dtype=np.float64)
    g = np.asarray(gallery, dtype=np.float64)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"expected (Q, D) and (G, D) embeddings, got {q.shape} and {g.shape}")
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    return 1.0 - qn @ gn.T
