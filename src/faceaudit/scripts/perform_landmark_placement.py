"""Face-mesh landmarks on the CT, raw PET, wavelet PET and U-Net PET renders of every
cross-validation fold's test set; detection rates and landmark error (MAD, well placed)."""

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from faceaudit.core.cli import add_common_args

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ct_files", required=True, help="folder of CT renders <id>.png (reconstruction cts/)")
    parser.add_argument("--pet_files", required=True, help="folder of PET renders <id>.png (reconstruction pets/)")
    parser.add_argument("--splits_file", required=True, help="splits.json written by perform_crossval.py")
    parser.add_argument("--models_path", default=None,
                        help="folder with best_model_fold{k}.pt, used for the U-Net variant when "
                             "--denoised_dir has no images for a fold")
    parser.add_argument("--denoised_dir", default=None,
                        help="denoised PET written by the cross-validation: DIR/fold{k}/<id>.png")
    parser.add_argument("--save_dir", required=True, help="output folder (created 0700)")
    parser.add_argument("--upstream-mad", "--upstream_mad", dest="upstream_mad", action="store_true",
                        help="divide the MAD by 468 as upstream does (default: by the 478 points summed)")
    parser.add_argument("--upscale", type=float, default=1.0,
                        help="resample factor applied before the face mesh (default 1, upstream)")
    parser.add_argument("--pad", type=float, default=0.0,
                        help="black border added before the face mesh: pixels, or a fraction of the "
                             "image size if < 1 (default 0, upstream)")
    parser.add_argument("--min_detection_confidence", type=float, default=0.5)
    parser.add_argument("--n_qa", type=int, default=6, help="test images drawn in qa_landmarks.png")
    add_common_args(parser)
    return parser


def run(args: argparse.Namespace):
    """Options from the arguments (OptionsError: exit 2), then the stage."""
    from faceaudit.core.cli import run_settings
    from faceaudit.petct.placement import PlacementOptions, run_landmark_placement

    options = PlacementOptions(models_dir=args.models_path, denoised_dir=args.denoised_dir,
                               upstream_mad=args.upstream_mad, upscale=args.upscale, pad=args.pad,
                               min_detection_confidence=args.min_detection_confidence, n_qa=args.n_qa)
    return run_landmark_placement(args.ct_files, args.pet_files, args.splits_file, args.save_dir, options,
                                  run=run_settings(args))


def main(argv=None) -> int:
    from faceaudit.core.cli import run_guarded

    return run_guarded(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
