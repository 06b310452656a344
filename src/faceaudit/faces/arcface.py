"""ArcFace-style ONNX recognizers: reading and checking the file, the input normalisation, the
forward pass.

Normalisation
-------------
An ArcFace ONNX is fed ``(pixel in 0..255 - input_mean) / input_std``, NCHW float32. The
values are never guessed from node names (insightface's ``ArcFaceONNX`` does: a graph whose
first nodes are named ``Sub...``/``Mul...`` is taken to normalise itself, so a converted
graph named otherwise is normalised twice, and one whose unrelated first nodes happen to be
named so is not normalised at all, silently). They come from, in this order:

1. the option (``--input_mean`` and ``--input_std``, both or neither);
2. a sidecar JSON next to the model, ``<model stem>.json`` holding ``{"input_mean": m,
   "input_std": s}``;
3. the graph rule :func:`graph_normalises_itself`, decided by operator types and constant
   operands only: the graph's input feeds exactly one ``Sub`` of a constant, whose output
   feeds exactly one ``Mul`` or ``Div`` by a constant (the MXNet-exported ArcFace prologue).
   Then the graph normalises itself: mean 0, std 1;
4. else insightface's model-zoo ArcFace convention: mean 127.5, std 127.5 (``w600k_r50``).

``describe()`` of every embedder records the values and which of these gave them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from faceaudit.core.files import InputError, read_json_file

ARCFACE_SOURCE = ("any ArcFace ONNX with a 112x112 input, e.g. w600k_r50.onnx from "
                  "insightface's buffalo_l pack (https://github.com/deepinsight/insightface"
                  "/releases, v0.7) or an ArcFace exported from the insightface "
                  "recognition model zoo")
#: What an ArcFace-style ONNX must look like (insightface's routing rule for recognition).
ARCFACE_SIGNATURE = ("one float input (N, 3, S, S), S >= 112 and a multiple of 16 (ArcFace "
                     "w600k_r50: 'input.1' (N, 3, 112, 112)), and one output (N, D), the "
                     "embedding (w600k_r50: D = 512)")
ARCFACE_EXPECTED = f"an ArcFace-style ONNX model ({ARCFACE_SIGNATURE})"
#: insightface model-zoo ArcFace (w600k_r50 and kin): the graph expects (x - 127.5) / 127.5
ZOO_ARCFACE_MEAN = 127.5
ZOO_ARCFACE_STD = 127.5


# --------------------------------------------------------------------------- the file


def read_onnx_model(path: Path, *, expected: str = "an ONNX model"):
    """The parsed ``onnx.ModelProto`` of ``path`` (weights not loaded), or an InputError
    saying what the file is instead: missing, not named ``*.onnx``, empty, not protobuf,
    or protobuf without a graph. ``expected`` describes the model wanted, for the message.
    """
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"expected {expected} at {path}, found nothing")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"expected {expected} at {path}, found an empty file (0 bytes)")
    try:
        model = onnx.load(str(path), load_external_data=False)
        parse_error = ""
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:  # onnx raises no own type
        model, parse_error = None, f"{type(exc).__name__}: {exc}"
    if model is None or not model.graph.node or not graph_inputs(model):
        what = (f"bytes that do not parse as ONNX protobuf ({parse_error})" if parse_error
                else "protobuf without an ONNX graph (no nodes or no inputs)")
        raise InputError(f"expected {expected} at {path}, found {size} {what}; "
                         f"first bytes {path.read_bytes()[:16]!r}")
    if path.suffix.lower() != ".onnx":
        # insightface routes by file name: a valid model named *.bin is looked up as a
        # model-zoo name and fails obscurely, so the name is part of the contract
        raise InputError(f"expected {expected} in a file named *.onnx, found {path.name} (an ONNX "
                         f"model by its content): rename it to {path.with_suffix('.onnx').name}")
    return model


def graph_inputs(model) -> list:
    """The graph's real inputs (older exporters list the weights as inputs too)."""
    weights = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in weights]


def _shape_of(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value_info.type.tensor_type.shape.dim]


def onnx_signature(model) -> tuple[dict[str, list], dict[str, list]]:
    """({input name: shape}, {output name: shape}) of a parsed ONNX model; a symbolic
    dimension is its name (e.g. 'N'), an unknown one '?'."""
    return ({i.name: _shape_of(i) for i in graph_inputs(model)},
            {o.name: _shape_of(o) for o in model.graph.output})


def check_arcface_signature(path: Path, model) -> None:
    """An ArcFace-style recognizer as insightface routes it: one input (N, 3, S, S) with
    S >= 112 a multiple of 16, one output (N, D) with a fixed D. Else an InputError
    saying what was expected and what the file holds."""
    inputs, outputs = onnx_signature(model)
    ok = len(inputs) == 1 and len(outputs) == 1
    if ok and graph_inputs(model)[0].type.tensor_type.elem_type != 1:   # TensorProto.FLOAT
        inputs = {name: [*shape, "(not float32)"] for name, shape in inputs.items()}
        ok = False
    if ok:
        shape, out = next(iter(inputs.values())), next(iter(outputs.values()))
        size = shape[2] if len(shape) == 4 else None
        ok = (len(shape) == 4 and shape[1] == 3 and isinstance(size, int) and size == shape[3]
              and size >= 112 and size % 16 == 0
              and len(out) == 2 and isinstance(out[1], int) and out[1] > 0)
    if not ok:
        raise InputError(
            f"{path} is not an ArcFace-style recognition model: expected {ARCFACE_SIGNATURE}; "
            f"found inputs {_signature_text(inputs)} and outputs {_signature_text(outputs)}; "
            f"{ARCFACE_SOURCE}")


def _signature_text(values: dict[str, list]) -> str:
    if not values:
        return "none"
    return ", ".join(f"{name!r} ({', '.join(str(d) for d in shape)})" for name, shape in values.items())


# --------------------------------------------------------------------------- normalisation


@dataclass(frozen=True)
class Normalisation:
    """The model is fed ``(pixel in 0..255 - mean) / std``; ``source`` says who decided it."""

    mean: float
    std: float
    source: str

    def describe(self) -> dict:
        return {"input_mean": self.mean, "input_std": self.std, "normalisation": self.source}


def checked_normalisation(mean, std, *, where: str) -> tuple[float, float] | None:
    """(mean, std) as floats, None when both are None; OptionsError-worthy values (one of
    the two alone, a non-finite mean, std <= 0) raise InputError naming ``where``."""
    if mean is None and std is None:
        return None
    try:
        m, s = float(mean), float(std)
    except (TypeError, ValueError):
        m, s = float("nan"), float("nan")
    if not (math.isfinite(m) and math.isfinite(s) and s > 0):
        raise InputError(f"expected input_mean (a finite number) and input_std (> 0) together "
                         f"in {where}, found input_mean={mean!r}, input_std={std!r}")
    return m, s


def _constant_names(model) -> set[str]:
    names = {t.name for t in model.graph.initializer}
    names |= {out for n in model.graph.node if n.op_type == "Constant" for out in n.output}
    return names


def graph_normalises_itself(model) -> bool:
    """True when the graph opens with ``Sub(input, constant)`` then ``Mul``/``Div`` by a
    constant, each the only reader of the value before it (by operator type, never name)."""
    inputs = graph_inputs(model)
    if len(inputs) != 1:
        return False
    constants = _constant_names(model)

    def only_reader(value: str):
        readers = [n for n in model.graph.node if value in n.input]
        return readers[0] if len(readers) == 1 else None

    sub = only_reader(inputs[0].name)
    if sub is None or sub.op_type != "Sub" or list(sub.input[:1]) != [inputs[0].name] \
            or len(sub.input) != 2 or sub.input[1] not in constants:
        return False
    scale = only_reader(sub.output[0])
    if scale is None or scale.op_type not in ("Mul", "Div") or len(scale.input) != 2:
        return False
    other = scale.input[1] if scale.input[0] == sub.output[0] else scale.input[0]
    return other in constants and (scale.op_type == "Mul" or scale.input[0] == sub.output[0])


def sidecar_path(model_path: Path) -> Path:
    """``<model stem>.json`` beside the model: where its input_mean / input_std may be given."""
    return Path(model_path).with_suffix(".json")


def arcface_normalisation(model_path: Path, model, *, mean: float | None = None,
                          std: float | None = None) -> Normalisation:
    """The normalisation of an ArcFace ONNX by the order in the module docstring."""
    given = checked_normalisation(mean, std, where="the options (--input_mean, --input_std)")
    if given is not None:
        return Normalisation(*given, "option")
    sidecar = sidecar_path(model_path)
    if sidecar.is_file():
        record = read_json_file(sidecar)
        values = checked_normalisation(record.get("input_mean"), record.get("input_std"),
                                       where=str(sidecar))
        if values is None:
            raise InputError(f"expected input_mean and input_std in {sidecar}, found keys "
                             f"{sorted(record)}")
        return Normalisation(*values, f"sidecar {sidecar.name}")
    if graph_normalises_itself(model):
        return Normalisation(0.0, 1.0, "graph rule: the graph opens with Sub and Mul/Div by "
                                       "constants (it normalises itself)")
    return Normalisation(ZOO_ARCFACE_MEAN, ZOO_ARCFACE_STD,
                         "default: insightface model-zoo ArcFace (x - 127.5) / 127.5")


# --------------------------------------------------------------------------- the forward pass


class ArcFaceRecognizer:
    """An ArcFace ONNX run by onnxruntime with an explicit normalisation.

    ``get_feat(crops)``: aligned crops (S, S, 3) or (N, S, S, 3) uint8, channels reversed
    before the model (as insightface's ``blobFromImages(swapRB=True)``: a BGR crop reaches
    the model as RGB), ``(x - mean) / std``, NCHW -> (N, D) float32.
    """

    def __init__(self, path: str | os.PathLike, normalisation: Normalisation) -> None:
        from faceaudit.faces.onnx_session import cpu_session

        self.model_file = str(path)
        self.normalisation = normalisation
        self.session = cpu_session(path)
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.input_size = (int(first.shape[3]), int(first.shape[2]))
        self.output_shape = self.session.get_outputs()[0].shape

    def get_feat(self, crops: np.ndarray) -> np.ndarray:
        crops = np.asarray(crops)
        if crops.ndim == 3:
            crops = crops[None]
        pixels = crops[..., ::-1].astype(np.float32)
        blob = (pixels - np.float32(self.normalisation.mean)) / np.float32(self.normalisation.std)
        blob = np.ascontiguousarray(blob.transpose(0, 3, 1, 2))
        return np.asarray(self.session.run(None, {self.input_name: blob})[0], dtype=np.float32)
