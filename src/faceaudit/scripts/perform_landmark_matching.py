"""PET -> CT identification from face-mesh landmarks: distance matrices, top-k and CMC,
without alignment (upstream) and after Procrustes alignment (or the upstream ICP); with
--embedder, also by face recognizers on the renders, against the same gallery."""

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from faceaudit.core.cli import add_common_args
    from faceaudit.petct.matching import DEFAULT_ALIGNS

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--landmarks_files", required=True,
                        help="output folder of perform_landmark_placement.py (fold{k}/landmarks_*.npz)")
    parser.add_argument("--n_folds", type=int, default=None, help="folds 0..K-1 (default: every fold found)")
    parser.add_argument("--save_dir", required=True, help="output folder (created 0700)")
    parser.add_argument("--align", default=",".join(DEFAULT_ALIGNS),
                        help="comma-separated alignments among none, rigid, similarity, icp "
                             f"(default {','.join(DEFAULT_ALIGNS)})")
    parser.add_argument("--icp", action="store_true",
                        help="add the upstream per-pair nearest-neighbour ICP (same as adding icp to --align)")
    parser.add_argument("--probe", default=None,
                        help="probe variant: pet_unet (default when present), pet, pet_wavelet, ...")
    parser.add_argument("--gallery", default="ct", help="gallery variant (default ct)")
    parser.add_argument("--distractors", default=None,
                        help="a landmarks .npz or a folder of them (a placement output folder gives its "
                             "landmarks_<gallery>.npz files): other people added to every gallery; a fold's "
                             "own files are skipped, so --distractors LM pools all folds' CTs")
    parser.add_argument("--embedder", default="",
                        help="comma-separated face recognizers among dlib, mobilefacenet, mobileface that also "
                             "attack the renders (embedding-based PET->CT identification in the same gallery); "
                             "default none. mobilefacenet and mobileface need `make models` once")
    parser.add_argument("--renders_dir", default=None,
                        help="with --embedder: the reconstruction's output folder (cts/ and pets/ <id>.png)")
    parser.add_argument("--denoised_dir", default=None,
                        help="with --embedder: also attack the U-Net PET renders in this folder "
                             "(the cross-validation's denoised/, fold{k}/<id>.png)")
    add_common_args(parser, jobs=False)
    return parser


def run(args: argparse.Namespace):
    """Options from the arguments (OptionsError: exit 2), then the stage."""
    from faceaudit.core.cli import run_settings
    from faceaudit.petct.matching import MatchingOptions, run_landmark_matching

    aligns = [a.strip() for a in args.align.split(",") if a.strip()]
    if args.icp and "icp" not in aligns:
        aligns.append("icp")
    options = MatchingOptions(n_folds=args.n_folds, probe_variant=args.probe, gallery_variant=args.gallery,
                              aligns=tuple(aligns), distractors=args.distractors,
                              embedders=tuple(n.strip() for n in args.embedder.split(",") if n.strip()),
                              renders_dir=args.renders_dir, denoised_dir=args.denoised_dir)
    return run_landmark_matching(args.landmarks_files, args.save_dir, options, run=run_settings(args))


def main(argv=None) -> int:
    from faceaudit.core.cli import run_guarded

    return run_guarded(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
