"""Images per second of the digital-mask stage on CPU, measured in one run.

* selection: read + (3x upscale) + RetinaFace + crop + MediaPipe face mesh + head pose,
  per ORL photo (92x112), and its parts (detector alone, face mesh alone);
* masking, per backend: face mesh on the 224 prep + backend mesh + pyrender render +
  face cut + compose (file writes excluded), and the render alone.

The flame backend runs on a synthetic model in FLAME's .npz layout built on MediaPipe's
topology (479 vertices; real FLAME has 5,023, and its fit cost grows with the landmark
count, not the vertex count, since only landmark triangles are skinned while fitting).
One process, torch and ONNX Runtime on one thread. Warm-up calls are excluded.
Usage: python benchmarks/bench_digital_mask.py [--n 40]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORL = ROOT / "src" / "faceaudit" / "data" / "orl_faces"


def _rate(fn, items) -> float:
    fn(items[0])  # warm-up
    start = time.perf_counter()
    for item in items:
        fn(item)
    return len(items) / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40, help="ORL photos (one per identity first)")
    args = parser.parse_args(argv)
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    import torch

    torch.set_num_threads(1)
    from faceaudit.mask import backends, flame, selection
    from faceaudit.mask.digital_mask import build_mask
    from faceaudit.mask.renderer import MaskRenderer

    paths = [ORL / f"s{i % 40 + 1}" / f"{i // 40 + 1}.pgm" for i in range(args.n)]
    images = [selection.InputImage(p.parent.name, "", p.stem, str(p)) for p in paths]
    options = selection.SelectionOptions()
    detector, mesh = selection._tools(options)

    rate_select = _rate(lambda im: selection.select_one(im, options), images)
    rgb = [selection.upscale(selection.read_rgb(p), 3) for p in paths]
    rate_detect = _rate(detector.detect, rgb)
    decisions = [selection.evaluate_image(selection.read_rgb(p), detector, mesh, options) for p in paths]
    preps = [d.prep for d in decisions if d.prep is not None]
    rate_mesh = _rate(mesh.detect, preps)
    print(f"selection ({len(images)} ORL photos, 92x112 -> 276x336): {rate_select:7.1f} images/s"
          f"   [RetinaFace alone {rate_detect:.1f}/s, face mesh on 224 prep alone {rate_mesh:.1f}/s]")

    renderer = MaskRenderer(224, 224)
    mean = backends.bundled_mean_shape()
    mask_backends = {"mediapipe": backends.MediaPipeBackend(), "meanshape": backends.MeanShapeBackend(mean)}
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from flame_fixtures import (
        synthetic_flame_model,  # test-only model, not in the package
    )

    flame_dict = synthetic_flame_model(mean)
    import tempfile

    from faceaudit.core.files import write_npz
    with tempfile.TemporaryDirectory() as tmp:
        write_npz(Path(tmp) / flame.FLAME_FILE, **flame_dict)
        mask_backends["flame"] = flame.FlameBackend(flame.load_flame(Path(tmp) / flame.FLAME_FILE))
    rates = {}
    for name, backend in mask_backends.items():
        def mask_one(p, backend=backend):
            return build_mask(p, backend=backend, face_mesh=mesh, renderer=renderer)

        rates[name] = _rate(mask_one, preps)
    lm = mesh.detect(preps[0])
    result = mask_backends["mediapipe"].build(preps[0], lm)
    rate_render = _rate(lambda _: renderer.render(result.vertices, result.faces), preps)
    for name, rate in rates.items():
        print(f"masking {name:9s} ({len(preps)} preps 224x224): {rate:7.1f} images/s"
              f"   = {rate / rate_select:.2f} x selection, {rate / rates['mediapipe']:.2f} x mediapipe")
    print(f"  render alone (pyrender EGL, {len(result.faces)} triangles): {rate_render:.1f}/s")
    renderer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
