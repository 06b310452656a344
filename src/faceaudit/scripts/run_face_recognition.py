#!/usr/bin/env python
"""Face-recognition attack on a digital-mask run: rank-k for Face2Face, Mask2Face, Mask2Mask...

Example:
    python run_face_recognition.py --masks_dir DM --save_dir FR
    python run_face_recognition.py --masks_dir DM --save_dir FR --backend dlib,mobilefacenet
    python run_face_recognition.py --masks_dir DM --save_dir FR_arc --backend arcface-onnx \\
        --model_dir ~/models/w600k_r50.onnx --cross_masks_dir DM_meanshape
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from faceaudit.core.cli import add_common_args, run_guarded, run_settings
    from faceaudit.faces.embedding import BACKENDS
    from faceaudit.mask.recognition import (
        SCENARIOS,
        RecognitionOptions,
        run_face_recognition,
    )

    defaults = RecognitionOptions()
    parser = argparse.ArgumentParser(
        description="Embed the photos and masks of a run_digital_mask.py folder and report "
                    "closed-set identification (rank-1/5/10 with Wilson 95%% intervals, CMC) and "
                    "open-set rates (true-accept rate at a false-accept rate of 1%% and 0.1%%, ROC) "
                    "for each query/database scenario.")
    parser.add_argument("--masks_dir", required=True,
                        help="output folder of run_digital_mask.py (manifest.csv + PNGs)")
    parser.add_argument("--save_dir", required=True, help="output folder (created 0700)")
    parser.add_argument("--backend", default=defaults.backend,
                        help=f"embedding model, one of {', '.join(BACKENDS)}, or several "
                             "separated by commas (dlib,mobilefacenet): each attacks every "
                             "scenario and the table shows them side by side (default: dlib, "
                             "bundled, offline; mobilefacenet and mobileface need `make models`)")
    parser.add_argument("--model_dir", "--model-dir", default=None,
                        help="insightface: a buffalo_l-style folder (det_10g.onnx, "
                             "w600k_r50.onnx); arcface-onnx: an ArcFace .onnx or its folder; "
                             "mobilefacenet/mobileface (without insightface or arcface-onnx in "
                             "--backend): the model cache folder instead of $FACEAUDIT_MODELS "
                             "or ~/.cache/faceaudit/models")
    parser.add_argument("--cross_masks_dir", default=None,
                        help="a second mask run (another mask backend) used as the database of "
                             "the cross-mask scenarios")
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=None,
                        metavar="NAME", help=f"subset of {', '.join(SCENARIOS)} (default: all "
                                             "within-mask, plus cross-mask with --cross_masks_dir)")
    parser.add_argument("--upstream-black-bug", dest="upstream_black_bug", action="store_true",
                        help="reproduce upstream's hard-coded black_background: every channel "
                             "value 255 -> 0 on every image")
    parser.add_argument("--upstream-scenario-bug", dest="upstream_scenario_bug",
                        action="store_true",
                        help="reproduce upstream's MaskOnlyBlack2Face (black masks on both sides)")
    parser.add_argument("--rgb-to-insightface", dest="rgb_to_insightface", action="store_true",
                        help="pass RGB to the insightface models as upstream did (default: BGR)")
    parser.add_argument("--input_mean", type=float, default=None,
                        help="insightface / arcface-onnx: the model is fed (pixel - input_mean) / "
                             "input_std; give both or neither (default: arcface-onnx reads "
                             "<model>.json beside the model, else its graph's own normalisation, "
                             "else 127.5 / 127.5, the insightface model zoo's; insightface: "
                             "127.5 / 127.5)")
    parser.add_argument("--input_std", type=float, default=None,
                        help="see --input_mean")
    parser.add_argument("--n_boot", type=int, default=defaults.n_boot,
                        help="bootstrap resamples for the 95%% interval of the mean rank "
                             "(default: 2000; rank-k intervals are Wilson's)")
    add_common_args(parser)
    args = parser.parse_args(argv)

    def build_and_run(*, run):
        # options are built inside the guarded call: a nonsense value exits 2, not a traceback
        options = RecognitionOptions(
            backend=args.backend, model_dir=args.model_dir,
            scenarios=tuple(args.scenarios) if args.scenarios else None,
            upstream_black_bug=args.upstream_black_bug,
            upstream_scenario_bug=args.upstream_scenario_bug,
            rgb_to_insightface=args.rgb_to_insightface, n_boot=args.n_boot,
            input_mean=args.input_mean, input_std=args.input_std)
        return run_face_recognition(args.masks_dir, args.save_dir, options, run=run,
                                    cross_masks_dir=args.cross_masks_dir)

    # the settings are built inside the guarded call too: --jobs 0 is exit 2, not a traceback
    return run_guarded(lambda: build_and_run(run=run_settings(args)))


if __name__ == "__main__":
    sys.exit(main())
