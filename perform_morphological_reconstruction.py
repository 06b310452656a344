#!/usr/bin/env python
"""PET/CT volumes -> head surfaces -> frontal 512 x 512 renders (stage 1 of the PET pipeline).

    python perform_morphological_reconstruction.py --petct_path DIR --save_dir OUT [--jobs N]

DIR: AutoPET layout PETCT_<patient>/<study>/{CTres,SUV}.nii.gz (CT/PET names and DICOM
folders accepted), the TCIA download of it (a study folder of DICOM series, CT and PET told
apart by Modality, PET in Bq/ml turned into SUV) or flat <id>_ct.nii.gz + <id>_pet.nii.gz
(or <id>_ct/, <id>_pet/ DICOM folders). Writes OUT/cts, OUT/pets, OUT/meshes, OUT/depth,
manifest.csv (with ct_face_qa / pet_face_qa), run.json, qa_montage.png. Exit 1 if a study
failed.
"""

import sys

from faceaudit.scripts.perform_morphological_reconstruction import main

if __name__ == "__main__":
    sys.exit(main())
