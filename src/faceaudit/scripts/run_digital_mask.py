"""Select frontal faces, pair database/query images and hide each face behind a rendered 3D mask.

Example:
    python run_digital_mask.py --input_dir src/faceaudit/data/orl_faces --save_dir DM --backend mediapipe
"""

import argparse
import sys


def main(argv=None) -> int:
    from faceaudit.core.cli import add_common_args, run_guarded

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input_dir", required=True,
                        help="<Identity>/<video>/<frame>.jpg (YouTube Faces) or <Identity>/<photo>")
    parser.add_argument("--save_dir", required=True, help="output folder (created 0700)")
    parser.add_argument("--backend", default="mediapipe", choices=("mediapipe", "flame", "meanshape"))
    parser.add_argument("--model_dir", "--model-dir", default=None,
                        help="flame: holds flame_model.npz; meanshape: holds meanshape.npz "
                             "(leave out for the bundled ORL mean)")
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
    parser.add_argument("--detect_size", type=int, default=640,
                        help="px; faces are detected on a copy whose long side is at most this")
    parser.add_argument("--min_face_size", type=float, default=40.0,
                        help="px; reject a face whose box side in the photo is below this")
    add_common_args(parser)
    args = parser.parse_args(argv)
    return run_guarded(_run, args)


def _run(args):
    """Options are built inside the guarded call, so a nonsense value exits 2 before any work."""
    from faceaudit.core.cli import run_settings
    from faceaudit.mask.digital_mask import DigitalMaskOptions, run_digital_mask

    options = DigitalMaskOptions(
        backend=args.backend, protocol=args.protocol, model_dir=args.model_dir,
        detector=args.detector, min_confidence=args.min_confidence,
        max_other_confidence=args.max_other_confidence, max_yaw=args.max_yaw,
        max_pitch=args.max_pitch, max_roll=args.max_roll, min_side=args.min_side,
        detect_size=args.detect_size, min_face_size=args.min_face_size)
    return run_digital_mask(args.input_dir, args.save_dir, options, run=run_settings(args))


if __name__ == "__main__":
    sys.exit(main())
