"""onnxruntime sessions as every model here runs them: CPU, one thread, quiet."""

from __future__ import annotations

import os


def cpu_session_options():
    """Session options: one intra-op thread (parallelism comes from --jobs worker processes,
    and the machines are shared), warnings and below not logged."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return opts


def cpu_session(model: bytes | str | os.PathLike):
    """An ``InferenceSession`` on the CPU of an ONNX file (path) or serialised model (bytes)."""
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=cpu_session_options(),
                                providers=["CPUExecutionProvider"])
