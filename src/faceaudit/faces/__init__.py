"""Face models used by both pipelines: MediaPipe's face mesh, face detectors, embedders."""
