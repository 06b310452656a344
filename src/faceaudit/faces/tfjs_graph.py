"""TensorFlow.js graph models: reading ``model.json`` + ``.bin`` shards, and repairing them.

``load_tfjs_graph`` reads the graph's nodes and its weights (the weights manifest's order,
dtypes and shapes, shards concatenated per group) into a :class:`TfjsGraph`;
``repair_prelu_2_3`` undoes two bugs of tfjs-converter 2.3.1 found in ``mobilefacenet.json``
(see its docstring). Converting to ONNX is :mod:`faceaudit.faces.tfjs_onnx`.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from faceaudit.core.files import InputError

_DTYPES = {"float32": np.float32, "int32": np.int32, "bool": np.bool_}


@dataclass
class TfjsGraph:
    """A parsed TFJS graph model.

    nodes : the ``modelTopology.node`` entries as in the JSON (dicts), Const nodes included.
    weights : Const name -> numpy array (float32 / int32), read from the shards.
    outputs : names of the nodes whose values the model returns.
    source : the JSON file it came from.
    """

    nodes: list[dict]
    weights: dict[str, np.ndarray]
    outputs: list[str]
    source: Path | None = None
    repairs: dict[str, int] = field(default_factory=dict)

    def node(self, name: str) -> dict | None:
        return next((n for n in self.nodes if n["name"] == name), None)


# --------------------------------------------------------------------------- reading


def load_tfjs_graph(json_path: str | os.PathLike) -> TfjsGraph:
    """Read a TFJS graph model: the JSON and the weight shards it names (same folder)."""
    path = Path(json_path)
    if not path.is_file():
        raise InputError(f"expected a TFJS graph model JSON at {path}, found nothing")
    try:
        model = json.loads(path.read_text(encoding="utf-8"))
        nodes = model["modelTopology"]["node"]
        manifest = model["weightsManifest"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"expected a TFJS graph model (modelTopology.node, weightsManifest) "
                         f"at {path}, found {type(exc).__name__}: {exc}") from exc
    if model.get("format", "graph-model") != "graph-model":
        raise InputError(f"expected format 'graph-model' in {path}, found {model.get('format')!r}")
    weights: dict[str, np.ndarray] = {}
    for group in manifest:
        weights.update(_read_weight_group(path.parent, group, path))
    return TfjsGraph(nodes=list(nodes), weights=weights, outputs=_output_names(model, nodes),
                     source=path)


def _read_weight_group(folder: Path, group: dict, json_path: Path) -> dict[str, np.ndarray]:
    """One manifest group: its shards concatenated, sliced in the manifest's order."""
    chunks = []
    for shard in group["paths"]:
        shard_path = folder / shard
        if not shard_path.is_file():
            raise InputError(f"expected the weight shard {shard_path} named in {json_path}, "
                             "found nothing")
        chunks.append(shard_path.read_bytes())
    buffer = b"".join(chunks)
    offset, out = 0, {}
    for entry in group["weights"]:
        if "quantization" in entry:
            raise InputError(f"{json_path}: weight {entry['name']!r} is quantized "
                             f"({entry['quantization']}); expected plain float32/int32 weights")
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise InputError(f"{json_path}: weight {entry['name']!r} has dtype "
                             f"{entry['dtype']!r}; expected one of {sorted(_DTYPES)}")
        shape = tuple(int(s) for s in entry["shape"])
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if offset + nbytes > len(buffer):
            raise InputError(f"{json_path}: the shards {group['paths']} hold {len(buffer)} bytes, "
                             f"expected at least {offset + nbytes} (up to {entry['name']!r})")
        out[entry["name"]] = np.frombuffer(buffer, dtype=np.dtype(dtype).newbyteorder("<"),
                                           count=nbytes // np.dtype(dtype).itemsize,
                                           offset=offset).astype(dtype).reshape(shape)
        offset += nbytes
    if offset != len(buffer):
        raise InputError(f"{json_path}: the shards {group['paths']} hold {len(buffer)} bytes, "
                         f"the manifest describes {offset}")
    return out


def _output_names(model: dict, nodes: list[dict]) -> list[str]:
    """The signature's outputs when the model has one, else the nodes nothing reads."""
    signature = model.get("signature") or (model.get("userDefinedMetadata") or {}).get("signature")
    if signature and signature.get("outputs"):
        return [tensor_name(o.get("name", key))
                for key, o in signature["outputs"].items()]
    read = {tensor_name(i) for n in nodes for i in n.get("input", [])}
    return [n["name"] for n in nodes if n["op"] != "Const" and n["name"] not in read]


def tensor_name(ref: str) -> str:
    """'node', 'node:0' -> 'node'; other output indices are not produced by supported ops."""
    name, _, index = ref.partition(":")
    if index not in ("", "0"):
        raise InputError(f"tensor {ref!r}: only the first output of a node is supported")
    return name


# --------------------------------------------------------------------------- repairs


def fused_ops(node: dict) -> list[str]:
    import base64

    values = node.get("attr", {}).get("fused_ops", {}).get("list", {}).get("s", [])
    return [base64.b64decode(v).decode("ascii") for v in values]


def set_fused_ops(node: dict, ops: list[str]) -> None:
    import base64

    node.setdefault("attr", {})["fused_ops"] = {
        "list": {"s": [base64.b64encode(o.encode("ascii")).decode("ascii") for o in ops]}}


def _prelu_patterns(graph: TfjsGraph):
    """(x, abs_node, sub_node, mul_node, slope_name) for each ``(x - |x|) * slope``."""
    by_name = {n["name"]: n for n in graph.nodes}
    for mul in graph.nodes:
        if mul["op"] != "Mul" or len(mul.get("input", [])) != 2:
            continue
        a, b = (tensor_name(i) for i in mul["input"])
        sub, slope = (by_name.get(a), b) if b in graph.weights else (by_name.get(b), a)
        if slope not in graph.weights or sub is None or sub["op"] != "Sub":
            continue
        x, abs_name = (tensor_name(i) for i in sub["input"])
        abs_node = by_name.get(abs_name)
        if abs_node is not None and abs_node["op"] == "Abs" \
                and tensor_name(abs_node["input"][0]) == x:
            yield x, abs_node, sub, mul, slope


def repair_prelu_2_3(graph: TfjsGraph) -> TfjsGraph:
    """Undo tfjs-converter 2.3.1's two PReLU bugs; returns a repaired copy.

    The network computes PReLU as ``relu(x) + slope * (x - |x|)`` (slope = alpha / 2).
    (a) every slope constant was stored negated (tensorflow/tfjs PR #6876): negated back;
    (b) where a Relu was fused into the convolution producing ``x`` although ``x`` also
    feeds the PReLU's ``Abs``/``Sub``, those read the rectified value and the PReLU became
    a plain ReLU: the convolution is split into the bias-only convolution (read again by
    ``Abs``/``Sub``) and a separate Relu (read by everything else).
    ``repairs`` of the result counts ``negated_slopes`` and ``unfused_relus``.
    """
    out = TfjsGraph(copy.deepcopy(graph.nodes), dict(graph.weights), list(graph.outputs),
                    graph.source, dict(graph.repairs))
    patterns = list(_prelu_patterns(out))
    for slope in sorted({p[4] for p in patterns}):
        out.weights[slope] = -out.weights[slope]
    by_name = {n["name"]: n for n in out.nodes}
    unfused = 0
    for x in sorted({p[0] for p in patterns}):
        conv = by_name[x]
        ops = fused_ops(conv)
        if conv["op"] not in ("_FusedConv2D", "FusedDepthwiseConv2dNative") or "Relu" not in ops:
            continue
        pre = f"{x}/pre_relu"
        pre_node = copy.deepcopy(conv)
        pre_node["name"] = pre
        set_fused_ops(pre_node, [o for o in ops if o != "Relu"])
        conv.update(op="Relu", input=[pre], attr={})
        out.nodes.insert(out.nodes.index(conv), pre_node)
        for _, abs_node, sub, _, _ in (p for p in patterns if p[0] == x):
            abs_node["input"] = [pre]
            sub["input"] = [pre, sub["input"][1]]
        unfused += 1
    slopes = len({p[4] for p in patterns})
    out.repairs["negated_slopes"] = out.repairs.get("negated_slopes", 0) + slopes
    out.repairs["unfused_relus"] = out.repairs.get("unfused_relus", 0) + unfused
    return out
