#!/usr/bin/env python
"""Train a PET -> CT render denoiser with patient-level K-fold cross-validation.

Example:
    python perform_crossval.py --ct_files OUT/cts --pet_files OUT/pets --save_perfs_dir CV \\
        --n_epochs 50 --n_folds 5"""

import sys

from faceaudit.scripts.perform_crossval import main

if __name__ == "__main__":
    sys.exit(main())
