#!/usr/bin/env python
"""Train a PET -> CT render denoiser with patient-level K-fold cross-validation.

Example:
    python perform_crossval.py --ct_files OUT/cts --pet_files OUT/pets --save_perfs_dir CV \\
        --n_epochs 50 --n_folds 5
"""

from __future__ import annotations

import argparse
import sys

from faceaudit.core.cli import add_common_args, run_guarded
from faceaudit.petct.crossval import DEFAULT_CROP, DENOISERS, DEVICES, SCHEMES, run_crossval
from faceaudit.petct.unet import ARCHS


def main(argv=None) -> int:
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
    parser.add_argument("--crop", type=int, default=DEFAULT_CROP,
                        help=f"centre crop in px (default {DEFAULT_CROP})")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default 0: torch's choice; 1 is often fastest "
                             "on a shared machine)")
    add_common_args(parser, jobs=False)
    args = parser.parse_args(argv)
    return run_guarded(run_crossval, **vars(args), args=vars(args))


if __name__ == "__main__":
    sys.exit(main())
