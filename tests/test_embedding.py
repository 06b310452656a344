"""Embedding backends: dlib on real faces; the insightface / ArcFace-ONNX paths end to end
with tiny ONNX models built here (no pretrained weights are available offline)."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import ORL
from faceaudit.core.files import InputError
from faceaudit.faces.embedding import (
    ArcFaceOnnxEmbedder,
    InsightFaceEmbedder,
    cosine_distances,
    dlib_model_dir,
    make_embedder,
)
from recognition_helpers import identify_folder

# insightface's norm_crop, called directly below, uses a deprecated skimage API
pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")


# five keypoints (eyes, nose, mouth corners) relative to a face centre, det-input pixels
KPS_OFFSETS = np.array([[-40, -30], [40, -30], [0, 5], [-30, 40], [30, 40]], dtype=float)


def tiny_arcface(path, *, dim=512, size=112, seed=0, names=("conv0", "relu0"),
                 prologue=None):
    """Conv(3->8, 8x8/8) -> ReLU -> Flatten -> Gemm(dim): an ArcFace-shaped ONNX (N,3,112,112).

    names : the node names of the Conv and the ReLU. prologue : (mean, std, names of the
    two nodes) to open the graph with Sub(input, mean) -> Mul(1 / std): a graph that
    normalises its input itself.
    """
    rng = np.random.default_rng(seed)
    cells = (size // 8) ** 2 * 8
    inits = [numpy_helper.from_array(rng.normal(0, 0.1, (8, 3, 8, 8)).astype(np.float32), "cw"),
             numpy_helper.from_array(np.zeros(8, np.float32), "cb"),
             numpy_helper.from_array(rng.normal(0, 0.02, (cells, dim)).astype(np.float32), "fw"),
             numpy_helper.from_array(np.zeros(dim, np.float32), "fb")]
    nodes, first = [], "input.1"
    if prologue is not None:
        mean, std, (sub_name, mul_name) = prologue
        inits += [numpy_helper.from_array(np.full((1, 3, 1, 1), mean, np.float32), "pm"),
                  numpy_helper.from_array(np.full((1, 3, 1, 1), 1 / std, np.float32), "ps")]
        nodes += [helper.make_node("Sub", ["input.1", "pm"], ["centred"], name=sub_name),
                  helper.make_node("Mul", ["centred", "ps"], ["scaled"], name=mul_name)]
        first = "scaled"
    nodes += [helper.make_node("Conv", [first, "cw", "cb"], ["c"], name=names[0],
                               kernel_shape=[8, 8], strides=[8, 8]),
              helper.make_node("Relu", ["c"], ["r"], name=names[1]),
              helper.make_node("Flatten", ["r"], ["f"], name="flat0", axis=1),
              helper.make_node("Gemm", ["f", "fw", "fb"], ["fc1"], name="fc0")]
    graph = helper.make_graph(
        nodes, "tiny_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return Path(path)


def fake_scrfd(path, *, faces, size=640):
    """A 9-output SCRFD-shaped detector (strides 8/16/32, 2 anchors, keypoints) whose outputs
    ignore the pixels: ``faces`` = [(score, (cx, cy), half_box)] at stride-32 anchors, in
    det-input pixels, each with KPS_OFFSETS around its centre."""
    nodes = [helper.make_node("ReduceMean", ["input.1"], ["m"], keepdims=0, name="mean0"),
             helper.make_node("Mul", ["m", "zero"], ["z"], name="zero0")]
    inits = [numpy_helper.from_array(np.array(0, np.float32), "zero")]
    outputs = {"score": [], "bbox": [], "kps": []}
    for stride in (8, 16, 32):
        n = (size // stride) ** 2 * 2
        score = np.zeros((n, 1), np.float32)
        bbox = np.ones((n, 4), np.float32)
        kps = np.zeros((n, 10), np.float32)
        if stride == 32:
            for s, (cx, cy), half in faces:
                ax, ay = (cx // 32) * 32, (cy // 32) * 32
                idx = (int(cy // 32) * (size // 32) + int(cx // 32)) * 2
                score[idx, 0] = s
                bbox[idx] = np.array([ax - cx + half, ay - cy + half, cx + half - ax,
                                      cy + half - ay]) / 32
                kps[idx] = (np.array([cx, cy]) + KPS_OFFSETS - [ax, ay]).ravel() / 32
        for kind, arr in (("score", score), ("bbox", bbox), ("kps", kps)):
            name = f"{kind}_{stride}"
            inits.append(numpy_helper.from_array(arr, name + "_c"))
            nodes.append(helper.make_node("Add", [name + "_c", "z"], [name], name="add_" + name))
            outputs[kind].append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                               list(arr.shape)))
    graph = helper.make_graph(
        nodes, "fake_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, size, size])],
        outputs["score"] + outputs["bbox"] + outputs["kps"], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return Path(path)


def _reference_arcface(model_path, bgr_crop, *, mean=127.5, std=127.5):
    """The ArcFace forward pass by hand: BGR -> RGB, (x - mean) / std, NCHW."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    blob = ((bgr_crop[:, :, ::-1].astype(np.float32) - mean) / std).transpose(2, 0, 1)[None]
    return sess.run(None, {"input.1": np.ascontiguousarray(blob)})[0].ravel()


def _orl(identity, stem):
    from PIL import Image

    return np.asarray(Image.open(ORL / identity / f"{stem}.pgm"))


def _astronaut():
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="module")
def dlib_embedder():
    return make_embedder("dlib")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    pack = root / "buffalo_tiny"
    pack.mkdir()
    # two faces in the 640x640 det input; the 0.9 one must win (FaceAnalysis: highest score)
    fake_scrfd(pack / "det_10g.onnx", faces=[(0.7, (200, 300), 100), (0.9, (400, 330), 90)])
    tiny_arcface(pack / "w600k_r50.onnx")
    lone = root / "arcface"
    lone.mkdir()
    tiny_arcface(lone / "model.onnx", seed=1)
    return {"pack": pack, "arcface": lone / "model.onnx"}


def test_dlib_models_found_without_importing_the_package():
    folder = dlib_model_dir()
    assert (folder / "dlib_face_recognition_resnet_model_v1.dat").is_file()


def test_dlib_embeds_a_face_and_reports_no_face(dlib_embedder):
    res = dlib_embedder.embed(_orl("s1", 1))  # grey 92x112: needs HOG upsampling
    assert res.found and res.vector.shape == (128,) and np.isfinite(res.vector).all()
    assert res.detector == "hog" and res.reason == ""
    none = dlib_embedder.embed(np.full((120, 100, 3), 128, np.uint8))
    assert not none.found and np.isnan(none.det_score)
    assert "no face found" in none.reason and "RetinaFace" in none.reason


def test_dlib_same_person_closer_than_another(dlib_embedder):
    a1, a2, b1 = (dlib_embedder.embed(_orl(i, s)).vector for i, s in
                  (("s1", 1), ("s1", 2), ("s2", 1)))
    d = cosine_distances(np.stack([a1]), np.stack([a2, b1]))[0]
    assert d[0] < d[1]


def test_cosine_distance_is_one_minus_cosine():
    q = np.array([[1.0, 0.0], [1.0, 1.0]])
    g = np.array([[2.0, 0.0], [0.0, 3.0]])
    expected = np.array([[0.0, 1.0], [1 - 1 / np.sqrt(2), 1 - 1 / np.sqrt(2)]])
    np.testing.assert_allclose(cosine_distances(q, g), expected, atol=1e-12)


def test_tiny_arcface_routes_through_insightface_model_zoo(tiny_models):
    from insightface.model_zoo import model_zoo
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX

    model = model_zoo.get_model(str(tiny_models["arcface"]), providers=["CPUExecutionProvider"])
    assert isinstance(model, ArcFaceONNX) and model.input_size == (112, 112)
    assert (model.input_mean, model.input_std) == (127.5, 127.5)


def test_arcface_onnx_aligns_with_norm_crop_and_matches_a_hand_forward(tiny_models):
    from insightface.utils.face_align import norm_crop

    from faceaudit.faces.facedetect import RetinaFaceDetector

    image = _astronaut()
    emb = make_embedder("arcface-onnx", model_dir=tiny_models["arcface"].parent)
    res = emb.embed(image)
    assert res.found and res.vector.shape == (512,) and res.detector == "retinaface"
    face = RetinaFaceDetector(min_score=0.5).detect(image)[0]
    crop = norm_crop(np.ascontiguousarray(image[:, :, ::-1]), face.keypoints, image_size=112)
    np.testing.assert_allclose(res.vector, _reference_arcface(tiny_models["arcface"], crop),
                               rtol=1e-4, atol=1e-5)
    rgb = make_embedder("arcface-onnx", model_dir=tiny_models["arcface"], rgb_to_model=True)
    assert not np.allclose(rgb.embed(image).vector, res.vector)  # the switch changes the input
    assert "no face found by RetinaFace" in emb.embed(np.zeros((200, 200, 3), np.uint8)).reason


def test_insightface_pack_uses_highest_scoring_face_and_bgr(tiny_models):
    from insightface.utils.face_align import norm_crop

    image = _astronaut()  # 512x512 -> det input 640x640, scale 1.25
    emb = make_embedder("insightface", model_dir=tiny_models["pack"])
    assert isinstance(emb, InsightFaceEmbedder) and emb.dim == 512
    res = emb.embed(image)
    assert res.found and res.detector == "scrfd"
    assert res.det_score == pytest.approx(0.9)
    kps = (np.array([400.0, 330.0]) + KPS_OFFSETS) / 1.25
    crop = norm_crop(np.ascontiguousarray(image[:, :, ::-1]), kps.astype(np.float32),
                     image_size=112)
    np.testing.assert_allclose(res.vector, _reference_arcface(tiny_models["pack"] /
                                                              "w600k_r50.onnx", crop),
                               rtol=1e-3, atol=1e-4)
    described = emb.describe()
    assert described["channel_order"] == "BGR" and set(described["model_files"]) == {
        "det_10g.onnx", "w600k_r50.onnx"}
    assert (described["input_mean"], described["input_std"]) == (127.5, 127.5)


def test_insightface_path_identifies_end_to_end(tiny_models, tmp_path):
    """Plumbing only: a random tiny model; identical photos must still match at rank 1."""
    from PIL import Image

    image = _astronaut()
    for ident, pixels in (("a", image), ("b", np.ascontiguousarray(image[:, ::-1]))):
        for stem in (1, 2):
            (tmp_path / ident).mkdir(exist_ok=True)
            Image.fromarray(pixels).save(tmp_path / ident / f"{stem}.png")
    for backend, model_dir in (("insightface", tiny_models["pack"]),
                               ("arcface-onnx", tiny_models["arcface"])):
        result = identify_folder(tmp_path, backend=backend, model_dir=model_dir, n_boot=50)
        assert result.metrics["n_queries"] == 2 and result.metrics["rank1"] == 1.0
        assert np.allclose(np.diag(result.distances), 0.0, atol=1e-5)


@pytest.mark.parametrize("make_dir", ["absent", "empty", "only_recognition"])
def test_missing_insightface_pack_names_the_files_and_never_downloads(tmp_path, tiny_models,
                                                                     monkeypatch, make_dir):
    import insightface.model_zoo.model_zoo as zoo

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(zoo, "download_onnx", no_download)
    folder = tmp_path / "buffalo_l"
    if make_dir != "absent":
        folder.mkdir()
    if make_dir == "only_recognition":
        tiny_arcface(folder / "w600k_r50.onnx")
    with pytest.raises(InputError) as err:
        make_embedder("insightface", model_dir=folder)
    text = str(err.value)
    assert str(folder) in text and "det_10g.onnx" in text and "insightface model zoo" in text
    if make_dir != "only_recognition":
        assert "w600k_r50.onnx" in text


def test_missing_or_wrong_arcface_model_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="needs --model_dir.*w600k_r50.onnx"):
        make_embedder("arcface-onnx", model_dir=None)
    with pytest.raises(InputError, match="no .onnx file in"):
        make_embedder("arcface-onnx", model_dir=tmp_path)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a protobuf at all" * 10)
    with pytest.raises(InputError, match="broken.onnx, found 210 bytes that do not parse as ONNX"):
        make_embedder("arcface-onnx", model_dir=broken)
    with pytest.raises(InputError, match="unknown embedding backend 'facenet'"):
        make_embedder("facenet")


def test_a_detector_is_not_accepted_as_arcface(tiny_models):
    with pytest.raises(InputError, match="not an ArcFace-style recognition model"):
        ArcFaceOnnxEmbedder(tiny_models["pack"] / "det_10g.onnx")


# ---------------------------------------------------------------- broken model files (issue 12.9)


def _wrong_onnx(path, *, input_shape, output_dim, input_name="x"):
    """A valid ONNX that is not an ArcFace: Flatten -> MatMul to ``output_dim``."""
    flat = int(np.prod([d for d in input_shape[1:]]))
    w = numpy_helper.from_array(np.ones((flat, output_dim), np.float32), "w")
    nodes = [helper.make_node("Flatten", [input_name], ["f"], axis=1),
             helper.make_node("MatMul", ["f", "w"], ["y"])]
    graph = helper.make_graph(
        nodes, "wrong", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT,
                                                       ["N", *input_shape[1:]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", output_dim])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return Path(path)


EXPECTED_SIGNATURE = ("'input.1' (N, 3, 112, 112)", "D = 512")


@pytest.mark.parametrize("case", ["tfjs_bin", "onnx_named_bin", "garbage", "empty", "flat_input",
                                  "not_square", "two_outputs_detector"])
def test_broken_arcface_model_files_name_the_file_expected_and_found(tmp_path, tiny_models, case):
    if case == "tfjs_bin":   # a TFJS weights shard, as the human-models package ships them
        path = tmp_path / "mobilefacenet.bin"
        path.write_bytes(np.random.default_rng(0).normal(size=256).astype(np.float32).tobytes())
    elif case == "onnx_named_bin":
        path = tmp_path / "x.bin"
        path.write_bytes(tiny_models["arcface"].read_bytes())
    elif case == "garbage":
        path = tmp_path / "garbage.onnx"
        path.write_bytes(b"\x08\x07garbage" * 50)
    elif case == "empty":
        path = tmp_path / "empty.onnx"
        path.write_bytes(b"")
    elif case == "flat_input":
        path = _wrong_onnx(tmp_path / "flat.onnx", input_shape=[1, 10], output_dim=4)
    elif case == "not_square":
        path = _wrong_onnx(tmp_path / "ns.onnx", input_shape=[1, 3, 112, 96], output_dim=128,
                           input_name="data")
    else:
        path = tiny_models["pack"] / "det_10g.onnx"
    with pytest.raises(InputError) as err:
        make_embedder("arcface-onnx", model_dir=path)
    text = str(err.value)
    assert str(path) in text or path.name in text
    assert all(part in text for part in EXPECTED_SIGNATURE), text
    found = {"tfjs_bin": ("1024 bytes", "ONNX"),
             "onnx_named_bin": ("in a file named *.onnx", "rename it to x.onnx"),
             "garbage": ("450 bytes that do not parse as ONNX protobuf",),
             "empty": ("found an empty file (0 bytes)",),
             "flat_input": ("found inputs 'x' (N, 10) and outputs 'y' (N, 4)",),
             "not_square": ("found inputs 'data' (N, 3, 112, 96) and outputs 'y' (N, 128)",),
             "two_outputs_detector": ("not an ArcFace-style recognition model",
                                      "outputs 'score_8'")}[case]
    assert all(part in text for part in found), text
    assert "list index out of range" not in text and "Protobuf parsing failed" not in text


def test_a_garbage_file_in_an_insightface_pack_is_named(tmp_path):
    pack = tmp_path / "buffalo_l"
    pack.mkdir()
    (pack / "det_10g.onnx").write_bytes(b"\0" * 100)
    tiny_arcface(pack / "w600k_r50.onnx")
    with pytest.raises(InputError, match=r"det_10g.onnx, found 100 bytes"):
        make_embedder("insightface", model_dir=pack)


def test_dlib_takes_the_retinaface_box_when_hog_finds_nothing():
    from faceaudit.faces.embedding import DlibEmbedder

    res = DlibEmbedder(upsample=()).embed(_astronaut())   # no HOG pass at all
    assert res.found and res.detector == "retinaface" and res.det_score > 0.9


# ------------------------------------------------------- input normalisation (issue 14's trap)


def _crop_of(image):
    """The BGR ArcFace crop of the image's best RetinaFace face."""
    from insightface.utils.face_align import norm_crop

    from faceaudit.faces.facedetect import RetinaFaceDetector

    face = RetinaFaceDetector(min_score=0.5).detect(image)[0]
    return norm_crop(np.ascontiguousarray(image[:, :, ::-1]), face.keypoints, image_size=112)


def test_arcface_onnx_normalises_exactly_once_whatever_the_node_names(tmp_path):
    """The same weights (a) behind a Sub/Mul prologue named otherwise than insightface's
    guess looks for ('prep/...'), (b) without a prologue but with first nodes named 'Sub...'
    and 'Mul...': both must give the embedding of one (x - 127.5) / 127.5. insightface's
    name guess fed (a) a normalised blob that the graph normalised again, and (b) raw pixels."""
    for folder in ("plain", "self", "misnamed"):
        (tmp_path / folder).mkdir()
    plain = tiny_arcface(tmp_path / "plain" / "plain.onnx")
    self_norm = tiny_arcface(tmp_path / "self" / "self.onnx",
                             prologue=(127.5, 127.5, ("prep/centre", "prep/scale")))
    misnamed = tiny_arcface(tmp_path / "misnamed" / "misnamed.onnx", names=("Sub_conv", "Mul_relu"))
    image = _astronaut()
    want = _reference_arcface(plain, _crop_of(image))
    for path, mean_std, rule in ((self_norm, (0.0, 1.0), "graph rule"),
                                 (misnamed, (127.5, 127.5), "default")):
        emb = make_embedder("arcface-onnx", model_dir=path)
        np.testing.assert_allclose(emb.embed(image).vector, want, rtol=1e-4, atol=1e-5)
        info = emb.describe()
        assert (info["input_mean"], info["input_std"]) == mean_std
        assert info["normalisation"].startswith(rule)


def test_arcface_onnx_normalisation_from_the_option_or_a_sidecar(tmp_path):
    path = tiny_arcface(tmp_path / "model.onnx")
    image = _astronaut()
    crop = _crop_of(image)
    def by_hand(mean, std):
        return _reference_arcface(path, crop, mean=mean, std=std)

    (tmp_path / "model.json").write_text('{"input_mean": 127.5, "input_std": 128.0}')
    emb = make_embedder("arcface-onnx", model_dir=path)
    assert emb.describe()["normalisation"] == "sidecar model.json"
    np.testing.assert_allclose(emb.embed(image).vector, by_hand(127.5, 128.0), rtol=1e-4, atol=1e-5)
    emb = make_embedder("arcface-onnx", model_dir=path, input_mean=0.0, input_std=1.0)
    assert (emb.describe()["input_mean"], emb.describe()["normalisation"]) == (0.0, "option")
    np.testing.assert_allclose(emb.embed(image).vector, by_hand(0.0, 1.0), rtol=1e-4, atol=1e-4)
    (tmp_path / "model.json").write_text('{"mean": 0}')
    with pytest.raises(InputError, match="input_mean and input_std in .*model.json"):
        make_embedder("arcface-onnx", model_dir=path)
    with pytest.raises(InputError, match="input_std \\(> 0\\)"):
        make_embedder("arcface-onnx", model_dir=path, input_mean=0.0, input_std=0.0)


def test_insightface_pack_normalisation_is_set_not_guessed(tmp_path):
    """A pack whose ArcFace opens with nodes named 'Sub...'/'Mul...' (a Conv and a ReLU):
    insightface guessed 'normalises itself' and fed raw pixels."""
    pack = tmp_path / "pack"
    pack.mkdir()
    fake_scrfd(pack / "det_10g.onnx", faces=[(0.9, (400, 330), 90)])
    tiny_arcface(pack / "w600k_r50.onnx", names=("Sub_conv", "Mul_relu"))
    image = _astronaut()
    kps = ((np.array([400.0, 330.0]) + KPS_OFFSETS) / 1.25).astype(np.float32)
    from insightface.utils.face_align import norm_crop

    crop = norm_crop(np.ascontiguousarray(image[:, :, ::-1]), kps, image_size=112)
    emb = make_embedder("insightface", model_dir=pack)
    np.testing.assert_allclose(emb.embed(image).vector,
                               _reference_arcface(pack / "w600k_r50.onnx", crop),
                               rtol=1e-3, atol=1e-4)
    assert emb.describe()["normalisation"].startswith("default")
    other = make_embedder("insightface", model_dir=pack, input_mean=127.5, input_std=128.0)
    info = other.describe()
    assert (info["input_mean"], info["input_std"], info["normalisation"]) == (127.5, 128.0, "option")
    np.testing.assert_allclose(other.embed(image).vector,
                               _reference_arcface(pack / "w600k_r50.onnx", crop, std=128.0),
                               rtol=1e-3, atol=1e-4)


def test_arcface_onnx_parses_the_model_file_once(tmp_path, monkeypatch):
    import onnx as onnx_module

    path = tiny_arcface(tmp_path / "model.onnx")
    calls = []
    real_load = onnx_module.load
    monkeypatch.setattr(onnx_module, "load", lambda *a, **k: calls.append(a) or real_load(*a, **k))
    make_embedder("arcface-onnx", model_dir=path)
    assert len(calls) == 1


def test_dlib_describe_pins_model_digests_computed_once_per_process(dlib_embedder, tmp_path,
                                                                    monkeypatch):
    from faceaudit.faces import embedding

    info = dlib_embedder.describe()
    for p in dlib_embedder.model_files:
        assert info["model_files"][p.name] == embedding.file_digest(p)
    calls = []
    real = embedding.file_digest
    monkeypatch.setattr(embedding, "file_digest", lambda p: calls.append(p) or real(p))
    embedding._digest_of.cache_clear()
    dlib_embedder.describe()
    dlib_embedder.describe()
    assert len(calls) == 2     # two model files, each hashed once
    # a model file of the same size but other bytes is another model
    copies = []
    for p in dlib_embedder.model_files:
        copy = tmp_path / p.name
        data = bytearray(p.read_bytes())
        data[-1] ^= 0xFF
        copy.write_bytes(bytes(data))
        copies.append(copy)
    monkeypatch.setattr(dlib_embedder, "model_files", copies)
    changed = dlib_embedder.describe()["model_files"]
    assert changed != info["model_files"] and set(changed) == set(info["model_files"])
