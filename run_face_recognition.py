#!/usr/bin/env python
"""Face-recognition attack on a digital-mask run: rank-k for Face2Face, Mask2Face, Mask2Mask...

Example:
    python run_face_recognition.py --masks_dir DM --save_dir FR
    python run_face_recognition.py --masks_dir DM --save_dir FR --backend dlib,mobilefacenet
    python run_face_recognition.py --masks_dir DM --save_dir FR_arc --backend arcface-onnx \
        --model_dir ~/models/w600k_r50.onnx --cross_masks_dir DM_meanshape"""

import sys

from faceaudit.scripts.run_face_recognition import main

if __name__ == "__main__":
    sys.exit(main())
