"""Training and inference images per second of both denoiser architectures at 208 x 208.

Measured in one run on CPU (and on CUDA when torch sees a GPU), with the stage's own
code paths: a training step is forward + 1 - MS-SSIM (5 scales, window 11) + backward +
Adam, on batches of ``--batch`` random PET/CT crops; inference is ``denoise_arrays`` in
eval mode. Warm-up steps are excluded. Prints images/s per architecture and the
ratio standard U-Net / upstream network.
Usage: python benchmarks/bench_denoiser.py [--batch 8] [--steps 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _train_rate(model, x, y, *, steps: int) -> float:
    import torch

    from faceaudit.petct.denoise_metrics import msssim_loss

    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()

    def step():
        optimiser.zero_grad(set_to_none=True)
        loss = msssim_loss(model(x), y)
        loss.backward()
        optimiser.step()

    step()  # warm-up
    _sync(x.device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(x.device)
    return steps * len(x) / (time.perf_counter() - start)


def _infer_rate(model, images: np.ndarray, *, batch: int, device: str, repeats: int) -> float:
    from faceaudit.petct.denoiser import denoise_arrays

    denoise_arrays(model, images[:batch], batch_size=batch, device=device)  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        denoise_arrays(model, images, batch_size=batch, device=device)
    _sync(device)
    return repeats * len(images) / (time.perf_counter() - start)


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="images per batch (default 8)")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps (default 4)")
    parser.add_argument("--size", type=int, default=208, help="crop side in px (default 208)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1; the machine is shared)")
    args = parser.parse_args(argv)
    import torch

    from faceaudit.petct.unet import build_model, count_parameters

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"denoiser throughput, {args.size}x{args.size} crops, batch {args.batch}, "
          f"torch {torch.__version__}, {args.threads} CPU thread(s)")
    for device in devices:
        ct = rng.random((args.batch, args.size, args.size), dtype=np.float32)
        pet = np.clip(ct + rng.normal(0, 0.1, ct.shape), 0, 1).astype(np.float32)
        x = torch.from_numpy(pet)[:, None].to(device)
        y = torch.from_numpy(ct)[:, None].to(device)
        rates = {}
        for arch in ("unet", "upstream"):
            torch.manual_seed(0)
            model = build_model(arch).to(device)
            train = _train_rate(model, x, y, steps=args.steps)
            infer = _infer_rate(model, np.concatenate([pet] * 2), batch=args.batch,
                                device=device, repeats=max(1, args.steps // 2))
            rates[arch] = (train, infer)
            print(f"  {device:4s} {arch:8s} ({count_parameters(model):,} params): "
                  f"train {train:7.2f} img/s   inference {infer:7.2f} img/s")
        (tu, iu), (tp, ip) = rates["unet"], rates["upstream"]
        print(f"  {device:4s} ratio unet / upstream: train {tu / tp:.2f}x   inference {iu / ip:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
