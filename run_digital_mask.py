#!/usr/bin/env python
"""Select frontal faces, pair database/query images and hide each face behind a rendered 3D mask.

Example:
    python run_digital_mask.py --input_dir src/faceaudit/data/orl_faces --save_dir DM --backend mediapipe"""

import sys

from faceaudit.scripts.run_digital_mask import main

if __name__ == "__main__":
    sys.exit(main())
