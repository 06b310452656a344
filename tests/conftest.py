"""Shared fixtures. Names are specific so that other test files can add their own."""

from importlib import resources
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def headsq_ct_path() -> Path:
    """The shipped real head CT (VTK headsq, raw units ~ HU + 1024)."""
    return Path(str(resources.files("faceaudit") / "data" / "vtk_headsq_ct" / "headsq_quarter.nii.gz"))


@pytest.fixture(scope="session")
def headsq_ct(headsq_ct_path):
    """The shipped head CT as a canonical faceaudit.petct.volumes.Volume."""
    from faceaudit.petct.volumes import load_volume

    return load_volume(headsq_ct_path)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small tensors run faster on one thread, and the test machine is shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


REPO_ROOT = Path(__file__).resolve().parents[1]
#: The bundled ORL faces (40 people x 10 photos), shipped in the package.
ORL = Path(str(resources.files("faceaudit") / "data" / "orl_faces"))


def load_script(name: str):
    """Import a repository-root stage script (``perform_crossval`` ...) as a module; pytest's
    sys.path need not hold the repository root, so it is loaded by path, once."""
    import importlib.util
    import sys

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def head_phantom(modality: str, half_width: float = 9.0):
    """(z, y, x) = (40, 36, 36) float32 head-on-neck phantom in the canonical LPS frame: head
    on top (high z), nose anterior (low y). CT in HU (40 inside, -1000 air); PET in SUV (1
    inside, 0.02 air, +7 in the brain). ``half_width`` (voxels, left-right) makes another
    patient's head. Shared by the stage-1 tests (reconstruction, TCIA DICOM studies)."""
    import numpy as np

    z, y, x = np.mgrid[:40, :36, :36].astype(np.float32)
    head = ((z - 27) / 11.0) ** 2 + ((y - 18) / 10.0) ** 2 + ((x - 18) / half_width) ** 2 <= 1.0
    nose = ((z - 26) / 3.0) ** 2 + ((y - 8) / 3.0) ** 2 + ((x - 18) / 2.0) ** 2 <= 1.0
    neck = (((y - 20) / 6.0) ** 2 + ((x - 18) / 6.0) ** 2 <= 1.0) & (z < 20)
    body = head | nose | neck
    if modality == "ct":
        return np.where(body, 40.0, -1000.0).astype(np.float32)
    brain = ((z - 29) / 7.0) ** 2 + ((y - 19) / 6.0) ** 2 + ((x - 18) / 6.0) ** 2 <= 1.0
    return (np.where(body, 1.0, 0.02) + np.where(brain, 7.0, 0.0)).astype(np.float32)
