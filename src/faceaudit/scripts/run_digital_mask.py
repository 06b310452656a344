"""Select frontal faces, pair database/query images and hide each face behind a rendered 3D mask.

Example:
    python run_digital_mask.py --input_dir src/faceaudit/data/orl_faces --save_dir DM --backend mediapipe
"""

import argparse
import sys


def main(argv=None) -> int:
    from faceaudit.core.cli import add_common_args, run_guarded
    from faceaudit.mask.backends import BACKENDS
    from faceaudit.mask.digital_mask import DigitalMaskOptions
    from faceaudit.mask.selection import DETECTORS, PROTOCOLS

    defaults = DigitalMaskOptions()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input_dir", required=True,
                        help="<Identity>/<video>/<frame>.jpg (YouTube Faces) or <Identity>/<photo>")
    parser.add_argument("--save_dir", required=True, help="output folder (created 0700)")
    parser.add_argument("--backend", default=defaults.backend, choices=BACKENDS)
    parser.add_argument("--model_dir", "--model-dir", default=None,
                        help="flame: holds flame_model.npz; meanshape: holds meanshape.npz "
                             "(leave out for the bundled ORL mean)")
    parser.add_argument("--protocol", default=defaults.protocol, choices=PROTOCOLS)
    parser.add_argument("--detector", default=defaults.detector, choices=DETECTORS)
    parser.add_argument("--min_confidence", type=float, default=defaults.min_confidence,
                        help="best face must score above this (default: %(default)s)")
    parser.add_argument("--max_other_confidence", type=float, default=defaults.max_other_confidence,
                        help="reject if any other face scores at least this (default: %(default)s)")
    parser.add_argument("--max_yaw", type=float, default=defaults.max_yaw,
                        help="degrees; keep |yaw| below (default: %(default)s)")
    parser.add_argument("--max_pitch", type=float, default=defaults.max_pitch,
                        help="degrees; keep |pitch| below (default: %(default)s)")
    parser.add_argument("--max_roll", type=float, default=defaults.max_roll,
                        help="degrees; roll is checked only when given")
    parser.add_argument("--min_side", type=int, default=defaults.min_side,
                        help="upscale images whose shorter side is below this, by an integer factor "
                             "(default: %(default)s)")
    parser.add_argument("--detect_size", type=int, default=defaults.detect_size,
                        help="px; faces are detected on a copy whose long side is at most this "
                             "(default: %(default)s)")
    parser.add_argument("--min_face_size", type=float, default=defaults.min_face_size,
                        help="px; reject a face whose box side in the photo is below this "
                             "(default: %(default)s)")
    add_common_args(parser)
    args = parser.parse_args(argv)
    return run_guarded(_run, args)


def _run(args):
    """Options are built inside the guarded call, so a nonsense value exits 2 before any work."""
    from dataclasses import fields

    from faceaudit.core.cli import run_settings
    from faceaudit.mask.digital_mask import DigitalMaskOptions, run_digital_mask

    options = DigitalMaskOptions(**{f.name: getattr(args, f.name) for f in fields(DigitalMaskOptions)})
    return run_digital_mask(args.input_dir, args.save_dir, options, run=run_settings(args))


if __name__ == "__main__":
    sys.exit(main())
