"""PET -> CT identification from face-mesh landmarks: distance matrices, top-k and CMC,
without alignment (upstream) and after Procrustes alignment (or the upstream ICP)."""

import argparse
import sys


def main(argv=None) -> int:
    from faceaudit.core.cli import add_common_args, run_guarded
    from faceaudit.petct.matching import DEFAULT_ALIGNS, run_landmark_matching

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
    add_common_args(parser, jobs=False)
    args = parser.parse_args(argv)
    aligns = [a.strip() for a in args.align.split(",") if a.strip()]
    if args.icp and "icp" not in aligns:
        aligns.append("icp")
    return run_guarded(
        run_landmark_matching, args.landmarks_files, args.save_dir, n_folds=args.n_folds,
        probe_variant=args.probe, gallery_variant=args.gallery, aligns=tuple(aligns),
        distractors=args.distractors, overwrite=args.overwrite, seed=args.seed, quiet=args.quiet,
        args=vars(args))


if __name__ == "__main__":
    sys.exit(main())
