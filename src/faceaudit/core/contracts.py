"""Names and sizes that stages exchange through files, defined once.

A stage that writes one of these and a stage that reads it both import it from here,
so the contract between them cannot drift.
"""

from __future__ import annotations

from pathlib import Path

# --- MediaPipe face mesh
N_LANDMARKS = 478            # face mesh with irises (refine_landmarks=True)
N_FACE_LANDMARKS = 468       # without the 10 iris points; upstream's MAD divisor

# --- image sizes
RENDER_SIZE = 512            # stage 1 renders are RENDER_SIZE x RENDER_SIZE
RENDER_CROP = 208            # centre crop the denoiser and the landmark stage use (upstream)
MASK_PREP_SIZE = 224         # stage 5 prepared face crops (Yang et al.)

# --- stage 1 -> stages 2, 3
CT_RENDERS = "cts"
PET_RENDERS = "pets"

# --- stage 2 -> stage 3
SPLITS_FILE = "splits.json"
MODELS_DIR = "models"
DENOISED_DIR = "denoised"


def model_path(models_dir: str | Path, fold: int) -> Path:
    """``best_model_fold{k}.pt``: the fold's denoiser weights (state_dict)."""
    return Path(models_dir) / f"best_model_fold{fold}.pt"


def model_info_path(models_dir: str | Path, fold: int) -> Path:
    """``best_model_fold{k}.json``: architecture and training settings beside the weights."""
    return Path(models_dir) / f"best_model_fold{fold}.json"


def denoised_fold_dir(root: str | Path, fold: int) -> Path:
    """``<root>/fold{k}``: the fold's denoised PET renders, ``<id>.png``."""
    return Path(root) / f"fold{fold}"


# --- stage 3 -> stage 4
def fold_dir(root: str | Path, fold: int) -> Path:
    return Path(root) / f"fold{fold}"


def landmarks_file(fold_folder: str | Path, variant: str) -> Path:
    """``landmarks_<variant>.npz``: ids, subjects, (n, 478, 3) landmarks, detected flags."""
    return Path(fold_folder) / f"landmarks_{variant}.npz"


# --- every stage
MANIFEST_FILE = "manifest.csv"
RUN_FILE = "run.json"

# --- stage 2 -> report
METRICS_FILE = "metrics.csv"     # per fold x test study: MS-SSIM and PSNR before/after denoising
DENOISE_SUMMARY_FILE = "summary.csv"   # per fold: mean metrics

# --- stage 3 -> report
DETECTION_FILE = "detection.csv"       # per variant: share of faces found
PLACEMENT_FILE = "placement.csv"       # per PET variant: landmark error (MAD)

# --- stage 4 -> report
TOPK_FILE = "topk.csv"           # one row per attack x k
RANKS_FILE = "ranks.csv"         # one row per fold x probe
GALLERY_GROWTH_FILE = "gallery_growth.csv"   # one row per attack x gallery size (10/20/40/full)


def model_info_for(model_file: str | Path) -> Path:
    """The settings file beside a model file: ``model_info_path(d, k)`` for ``model_path(d, k)``."""
    return Path(model_file).with_suffix(".json")


# --- stage 5 -> report
SELECTION_FILE = "selection.csv"  # every input photo: accepted/rejected, reason, pose, role
