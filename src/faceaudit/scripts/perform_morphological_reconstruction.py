"""PET/CT volumes -> head surfaces -> frontal 512 x 512 renders (stage 1 of the PET pipeline).

    python perform_morphological_reconstruction.py --petct_path DIR --save_dir OUT [--jobs N]

DIR: AutoPET layout PETCT_<patient>/<study>/{CTres,SUV}.nii.gz (CT/PET names and DICOM
folders accepted), the TCIA download of it (a study folder of DICOM series, CT and PET told
apart by Modality, PET in Bq/ml turned into SUV) or flat <id>_ct.nii.gz + <id>_pet.nii.gz
(or <id>_ct/, <id>_pet/ DICOM folders). Writes OUT/cts, OUT/pets, OUT/meshes, OUT/depth,
manifest.csv (with ct_face_qa / pet_face_qa), run.json, qa_montage.png. Exit 1 if a study
failed.
"""

import argparse
import sys


def main(argv=None) -> int:
    from faceaudit.core.cli import add_common_args, run_guarded, run_settings
    from faceaudit.core.contracts import RENDER_CROP
    from faceaudit.petct.reconstruction import ReconstructionOptions, run_reconstruction
    from faceaudit.petct.render import PROJECTIONS, SHADINGS
    from faceaudit.petct.surface import PET_THRESHOLDS

    defaults = ReconstructionOptions()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--petct_path", required=True, help="folder of PET/CT studies")
    parser.add_argument("--save_dir", required=True, help="output folder (created 0700)")
    add_common_args(parser)
    parser.add_argument("--ct-threshold", default=defaults.ct_threshold,
                        help="'otsu' (upstream, default) or a fixed level in HU, e.g. -300")
    parser.add_argument("--pet-threshold", choices=PET_THRESHOLDS, default=defaults.pet_threshold,
                        help="'adaptive' = fraction of the body's median SUV (default); "
                             "'percentile' = upstream 95th percentile of the whole volume")
    parser.add_argument("--pet-percentile", type=float, default=defaults.pet_percentile,
                        help="percentile used by --pet-threshold percentile (upstream: 95)")
    parser.add_argument("--pet-body-fraction", type=float, default=defaults.pet_body_fraction,
                        help="adaptive PET level as a fraction of the body's median SUV (default 0.5)")
    parser.add_argument("--head-height-mm", type=float, default=defaults.head_height_mm,
                        help="head crop: this many mm down from the top of the head")
    parser.add_argument("--no-fill-holes", action="store_true", help="upstream: no hole filling")
    parser.add_argument("--opening-radius-mm", type=float, default=defaults.opening_radius_mm,
                        help="a table or headrest touching the body is cut off by an opening of this "
                             "radius; a body touching nothing is left unchanged (0: off, as upstream)")
    parser.add_argument("--smoothing-iterations", type=int, default=defaults.smoothing_iterations,
                        help="Laplacian smoothing steps of the mesh (upstream: 5)")
    parser.add_argument("--shading", choices=SHADINGS, default=defaults.shading)
    parser.add_argument("--projection", choices=PROJECTIONS, default=defaults.projection)
    parser.add_argument("--head-px", type=int, default=defaults.head_px,
                        help=f"pixels spanned by the head box (default {defaults.head_px}: the head fits "
                             f"the {RENDER_CROP} centre crop the later stages take)")
    args = parser.parse_args(argv)

    def build_and_run(*, run):
        # options are built inside the guarded call: a nonsense value exits 2, not a traceback
        options = ReconstructionOptions(
            ct_threshold=args.ct_threshold, pet_threshold=args.pet_threshold,
            pet_percentile=args.pet_percentile, pet_body_fraction=args.pet_body_fraction,
            head_height_mm=args.head_height_mm, fill_holes=not args.no_fill_holes,
            opening_radius_mm=args.opening_radius_mm,
            smoothing_iterations=args.smoothing_iterations, shading=args.shading,
            projection=args.projection, head_px=args.head_px)
        return run_reconstruction(args.petct_path, args.save_dir, options, run=run)

    # the settings are built inside the guarded call too: --jobs 0 is exit 2, not a traceback
    return run_guarded(lambda: build_and_run(run=run_settings(args)))


if __name__ == "__main__":
    sys.exit(main())
