"""The published numbers our tables stand beside, with where each comes from.

They are the papers' results on the papers' data (AutoPET, 853 patients; YouTube
Faces, 555 identities), not a target for the simulated demo cohort.
"""

from __future__ import annotations

PET_SOURCE = ("Bou Hanna et al., Scientific Data 2024 (upstream notebooks, AutoPET, "
              "5 folds x 128 test studies, mean ± std over folds)")

#: variant -> (detection rate %, std) ; wavelet and U-Net are denoised PET.
PET_DETECTION = {
    "ct": (88.0, 1.6),
    "pet": (44.8, 4.0),
    "pet_wavelet": (46.9, 3.8),
    "pet_unet": (81.6, 3.1),
}

#: variant -> (well-placed landmark rate %, MAD < 15 % of the inter-ocular distance, std)
PET_WELL_PLACED = {
    "pet": (27.2, 3.0),
    "pet_wavelet": (28.8, 3.2),
    "pet_unet": (59.5, 3.5),
}

#: alignment -> {k: (top-k %, std)}; gallery about 103-115 CTs per fold, chance top-1 ~0.9 %.
PET_TOPK = {
    "none": {1: (78.5, 5.3), 3: (90.9, 2.8), 5: (92.5, 2.7), 10: (94.6, 2.2), 15: (96.0, 2.6)},
    "icp": {1: (31.9, 7.0), 3: (50.0, 9.1), 5: (58.5, 9.2), 10: (72.1, 7.4), 15: (77.9, 6.8)},
}
PET_GALLERY_SIZE = "about 103-115 per fold"

MASK_SOURCE = ("Meeus et al., Nature Medicine 2023 (Fig. 1), YouTube Faces, 555 identities, "
               "InsightFace buffalo_l, same-video protocol")

#: scenario -> (rank-1 %, note)
MASK_RANK1 = {
    "MaskOnly2MaskOnly": (52.0, "reported as Mask2Mask; which mask variant gave 52 % is not stated"),
}
MASK_NOTE = ("Mask2Face was reported far lower than Mask2Mask; its exact value could not be "
             "retrieved from the paper, so none is shown.")
