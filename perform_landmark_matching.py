#!/usr/bin/env python
"""PET -> CT identification from face-mesh landmarks: distance matrices, top-k and CMC,
without alignment (upstream) and after Procrustes alignment (or the upstream ICP); with
--embedder, also by face recognizers on the renders, against the same gallery."""

import sys

from faceaudit.scripts.perform_landmark_matching import main

if __name__ == "__main__":
    sys.exit(main())
