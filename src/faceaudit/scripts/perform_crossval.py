"""Train a PET -> CT render denoiser with patient-level K-fold cross-validation.

Example:
    python perform_crossval.py --ct_files OUT/cts --pet_files OUT/pets --save_perfs_dir CV \\
        --n_epochs 50 --n_folds 5
"""

from __future__ import annotations

import argparse
import sys

from faceaudit.core.cli import add_common_args, run_guarded, run_settings
from faceaudit.core.contracts import RENDER_CROP
from faceaudit.core.runner import StageResult
from faceaudit.petct.crossval import DENOISERS, DEVICES, SCHEMES, CrossvalOptions, run_crossval
from faceaudit.petct.unet import ARCHS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct_files", required=True, help="folder of CT renders <id>.png")
    parser.add_argument("--pet_files", required=True, help="folder of PET renders <id>.png")
    parser.add_argument("--save_perfs_dir", required=True, help="output folder")
    parser.add_argument("--n_epochs", type=int, default=50, help="epochs per fold (default 50)")
    parser.add_argument("--n_folds", type=int, default=5, help="folds (default 5)")
    parser.add_argument("--batch_size", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default 1e-2)")
    parser.add_argument("--splits_file", default=None,
                        help="reuse the folds of an earlier run's splits.json")
    parser.add_argument("--models_path", default=None,
                        help="folder for best_model_fold{k}.pt (default SAVE_PERFS_DIR/models)")
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--arch", choices=ARCHS, default="unet",
                        help="unet: U-Net with working BatchNorm; upstream: the paper's network")
    parser.add_argument("--denoiser", choices=DENOISERS, default="unet",
                        help="wavelet: upstream's BayesShrink baseline, no training")
    parser.add_argument("--split_scheme", choices=SCHEMES, default="kfold",
                        help="kfold: K folds grouped by patient; upstream: repeated random "
                             "70/15/15 splits of studies")
    parser.add_argument("--crop", type=int, default=RENDER_CROP,
                        help=f"centre crop in px (default {RENDER_CROP})")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default 0: torch's choice; 1 is often fastest "
                             "on a shared machine)")
    add_common_args(parser, jobs=False)
    return parser


def run(args: argparse.Namespace) -> StageResult:
    """Options are built here, inside the guarded call, so a bad value exits 2."""
    options = CrossvalOptions(
        n_epochs=args.n_epochs, n_folds=args.n_folds, batch_size=args.batch_size, lr=args.lr,
        arch=args.arch, denoiser=args.denoiser, split_scheme=args.split_scheme, crop=args.crop,
        splits_file=args.splits_file, models_path=args.models_path, device=args.device,
        threads=args.threads)
    return run_crossval(args.ct_files, args.pet_files, args.save_perfs_dir, options,
                        run=run_settings(args))


def main(argv=None) -> int:
    return run_guarded(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
