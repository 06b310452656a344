"""Select frontal faces, pair database/query images and hide each face behind a rendered 3D mask.

Example:
    python run_digital_mask.py --input_dir src/faceaudit/data/orl_faces --save_dir DM --backend mediapipe
"""

import argparse
import sys


def main(argv=None) -> int:
    from faceaudit.core.cli import add_common_args, run_guarded
    from faceaudit.mask.digital_mask import run_digital_mask

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input_dir", required=True,
                        help="<Identity>/<video>/<frame>.jpg (YouTube Faces) or <Identity>/<photo>")
    parser.add_argument("--save_dir", required=True, help="output folder (created 0700)")
    parser.add_argument("--backend", default="mediapipe", choices=("mediapipe", "flame", "meanshape"))
    parser.add_argument("--model_dir", "--model-dir", default=None,
                        help="flame: holds flame_model.npz; meanshape: may hold meanshape.npz")
    parser.add_argument("--protocol", default="same-video", choices=("same-video", "across-video"))
    parser.add_argument("--detector", default="retinaface", choices=("retinaface", "mediapipe"))
    parser.add_argument("--min_confidence", type=float, default=0.9,
                        help="best face must score above this")
    parser.add_argument("--max_other_confidence", type=float, default=0.1,
                        help="reject if any other face scores at least this")
    parser.add_argument("--max_yaw", type=float, default=20.0, help="degrees; keep |yaw| below")
    parser.add_argument("--max_pitch", type=float, default=20.0, help="degrees; keep |pitch| below")
    parser.add_argument("--max_roll", type=float, default=None,
                        help="degrees; roll is checked only when given")
    parser.add_argument("--min_side", type=int, default=224,
                        help="upscale images whose shorter side is below this (integer factor)")
    add_common_args(parser)
    args = parser.parse_args(argv)
    return run_guarded(run_digital_mask, args.input_dir, args.save_dir, backend=args.backend,
                       protocol=args.protocol, detector=args.detector,
                       min_confidence=args.min_confidence,
                       max_other_confidence=args.max_other_confidence, max_yaw=args.max_yaw,
                       max_pitch=args.max_pitch, max_roll=args.max_roll, min_side=args.min_side,
                       model_dir=args.model_dir, seed=args.seed, jobs=args.jobs,
                       overwrite=args.overwrite, progress=not args.quiet, run_args=vars(args))


if __name__ == "__main__":
    sys.exit(main())
