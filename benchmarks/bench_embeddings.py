"""Embeddings per second on CPU for each backend, measured in one run.

* dlib: the bundled ResNet 128-D model (HOG face box, 5-point shape) on 224x224 crops
  made from ORL photos (the mask stage's crop size).
* arcface-onnx: RetinaFace keypoints + norm_crop + an ArcFace network. No pretrained
  ArcFace is available offline, so the network is a RANDOMLY INITIALISED IResNet
  (insightface's architecture; r50 = w600k_r50's shape, 43.6 M parameters) exported
  to ONNX here: its speed is that of the real model, its embeddings mean nothing.
* the insightface pack path costs SCRFD-10GF + the same ArcFace; SCRFD weights are
  not available offline, so it is not timed.

One ONNX Runtime thread per embedder (the stage parallelises with --jobs). Warm-up
calls are excluded. Usage: python benchmarks/bench_embeddings.py [--n 20] [--arch r50]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ORL = ROOT / "src" / "faceaudit" / "data" / "orl_faces"
LAYERS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3)}


def orl_crops(n: int) -> list[np.ndarray]:
    """n ORL photos as 224x224 RGB (resized to 184x224, padded with grey)."""
    from PIL import Image

    out = []
    for i in range(n):
        ident, stem = f"s{i % 40 + 1}", i // 40 + 1
        img = Image.open(ORL / ident / f"{stem}.pgm").resize((184, 224), Image.BILINEAR)
        canvas = np.full((224, 224), 128, np.uint8)
        canvas[:, 20:204] = np.asarray(img)
        out.append(np.repeat(canvas[:, :, None], 3, axis=2))
    return out


def export_random_iresnet(path: Path, arch: str, seed: int = 0) -> int:
    """insightface's IResNet (IBasicBlock, PReLU, BN-Dropout-FC-BN head, 512-D) with
    random weights, exported to ONNX with a (N, 3, 112, 112) input. Returns #parameters."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(
                nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
                nn.BatchNorm2d(cout), nn.PReLU(cout),
                nn.Conv2d(cout, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

        def forward(self, x):
            return self.body(x) + (x if self.down is None else self.down(x))

    class IResNet(nn.Module):
        def __init__(self, layers):
            super().__init__()
            blocks, cin = [], 64
            for cout, n in zip((64, 128, 256, 512), layers):
                for i in range(n):
                    blocks.append(Block(cin, cout, 2 if i == 0 else 1))
                    cin = cout
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(64), nn.PReLU(64))
            self.blocks = nn.Sequential(*blocks)
            self.head = nn.Sequential(nn.BatchNorm2d(512), nn.Dropout(0.0), nn.Flatten(),
                                      nn.Linear(512 * 7 * 7, 512), nn.BatchNorm1d(512))

        def forward(self, x):
            return self.head(self.blocks(self.stem(x)))

    torch.manual_seed(seed)
    model = IResNet(LAYERS[arch]).eval()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(1, 3, 112, 112), str(path), dynamo=False,
                          input_names=["input.1"], output_names=["fc1"],
                          dynamic_axes={"input.1": {0: "N"}, "fc1": {0: "N"}}, opset_version=13)
    return sum(p.numel() for p in model.parameters())


def time_embedder(embedder, images, *, warmup: int = 2) -> tuple[float, int]:
    for img in images[:warmup]:
        embedder.embed(img)
    start = time.perf_counter()
    found = sum(embedder.embed(img).found for img in images)
    return time.perf_counter() - start, found


def time_parts(arcface, images) -> tuple[float, float]:
    """Seconds per image for RetinaFace detection alone and for the ArcFace forward alone."""
    det = arcface._detector
    crops = np.zeros((len(images), 112, 112, 3), np.uint8)
    det.detect(images[0])
    t0 = time.perf_counter()
    for img in images:
        det.detect(img)
    t_det = (time.perf_counter() - t0) / len(images)
    arcface.recognizer.get_feat(crops[0])
    t0 = time.perf_counter()
    for crop in crops:
        arcface.recognizer.get_feat(crop)
    return t_det, (time.perf_counter() - t0) / len(images)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="images per backend (default 20)")
    parser.add_argument("--arch", choices=sorted(LAYERS), default="r50",
                        help="IResNet depth of the random ArcFace (default r50, as w600k_r50)")
    args = parser.parse_args(argv)

    from faceaudit.faces.embedding import ArcFaceOnnxEmbedder, DlibEmbedder

    images = orl_crops(args.n)
    rows = []
    dlib_emb = DlibEmbedder()
    seconds, found = time_embedder(dlib_emb, images)
    rows.append(("dlib (HOG + ResNet-128)", seconds, found))
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / f"iresnet_{args.arch}_random.onnx"
        t0 = time.perf_counter()
        n_params = export_random_iresnet(onnx_path, args.arch)
        export_s = time.perf_counter() - t0
        arc = ArcFaceOnnxEmbedder(onnx_path)
        seconds, found = time_embedder(arc, images)
        rows.append((f"arcface-onnx (RetinaFace + random IResNet-{args.arch[1:]})", seconds, found))
        t_det, t_rec = time_parts(arc, images)

    print(f"embeddings/s on CPU, {args.n} ORL crops 224x224, 1 thread per embedder, "
          f"warm-up excluded")
    print(f"(random IResNet-{args.arch[1:]}: {n_params / 1e6:.1f} M parameters, "
          f"exported in {export_s:.1f} s; speed only, its embeddings are meaningless)")
    print(f"{'backend':<48} {'emb/s':>8} {'ms/img':>8} {'faces':>7}")
    for name, seconds, found in rows:
        print(f"{name:<48} {args.n / seconds:>8.2f} {1000 * seconds / args.n:>8.1f} "
              f"{found:>3d}/{args.n:<3d}")
    ratio = rows[1][1] / rows[0][1]
    print(f"arcface-onnx / dlib time per image: {ratio:.2f}x")
    print(f"arcface-onnx split: RetinaFace {1000 * t_det:.1f} ms + ArcFace forward "
          f"{1000 * t_rec:.1f} ms per image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
