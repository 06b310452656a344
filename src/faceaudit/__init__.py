"""faceaudit: measure how re-identifiable faces are in data believed anonymous."""

import os

# onnxruntime sends telemetry unless this is set before it is first imported, and every
# faceaudit module that reaches onnxruntime imports this package first. Nothing leaves
# the machine.
os.environ["ORT_DISABLE_TELEMETRY"] = "1"

__version__ = "0.1.0"
