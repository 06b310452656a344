#!/usr/bin/env python
"""Face-mesh landmarks on the CT, raw PET, wavelet PET and U-Net PET renders of every
cross-validation fold's test set; detection rates and landmark error (MAD, well placed)."""

import sys

from faceaudit.scripts.perform_landmark_placement import main

if __name__ == "__main__":
    sys.exit(main())
