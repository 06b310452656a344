"""The simulated demo cohort: layout, labelling, reproducibility, anatomy, faces."""

import gzip
import json
import os

import numpy as np
import pytest

from faceaudit.demo import cohort as demo_data
from faceaudit.petct.volumes import discover_studies, load_volume


@pytest.fixture(scope="module")
def demo_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    plan = demo_data.generate_cohort(out, n=2, seed=5, second_study_fraction=0.0, progress=False)
    return out, plan


def test_plan_is_reproducible_and_seeded():
    a = demo_data.plan_cohort(n=6, seed=0)
    assert a == demo_data.plan_cohort(n=6, seed=0)
    assert a != demo_data.plan_cohort(n=6, seed=1)
    assert len({e["patient"] for e in a}) == 6
    # a patient's studies share the identity but not the pose
    many = demo_data.plan_cohort(n=12, seed=0, second_study_fraction=1.0)
    first, second = many[0], many[1]
    assert first["patient"] == second["patient"] and first["identity"] == second["identity"]
    assert first["pose"] != second["pose"]


def test_cohort_layout_and_simulated_labels(demo_cohort):
    out, plan = demo_cohort
    studies = discover_studies(out)
    assert [s.id for s in studies] == sorted(e["id"] for e in plan)
    assert all(s.ct.name == "CTres.nii.gz" and s.pet.name == "SUV.nii.gz" for s in studies)
    assert "SIMULATED" in (out / "SIMULATED.txt").read_text()
    record = json.loads((out / "cohort.json").read_text())
    assert record["simulated"] is True and record["studies"] == json.loads(json.dumps(plan))
    with gzip.open(studies[0].ct, "rb") as fh:
        header = fh.read(348)
    assert header[148:228].rstrip(b"\0").decode() == demo_data.SIMULATED_NOTE
    for path in (out, studies[0].ct.parent.parent, studies[0].ct.parent):
        assert os.stat(path).st_mode & 0o777 == 0o700, path
    assert os.stat(studies[0].ct).st_mode & 0o777 == 0o600


def test_ct_and_pet_are_realistic_and_share_the_pose(demo_cohort):
    out, _plan = demo_cohort
    study = discover_studies(out)[0]
    ct, pet = load_volume(study.ct), load_volume(study.pet)
    assert ct.shape == pet.shape
    np.testing.assert_allclose(ct.spacing, (3.0, 2.04, 2.04), atol=1e-4)
    assert ct.array.min() < -950 and np.median(ct.array) < -900          # air in HU
    assert 250 <= np.percentile(ct.array, 99.9) < 3072                  # bone, table
    brain_suv = np.percentile(pet.array, 99.9)
    body = ct.array > -300
    skin_suv = np.median(pet.array[body & (ct.array < 100)])
    assert brain_suv > 4 * skin_suv and 0.3 < skin_suv < 1.2
    # same anatomy and pose in both: face front (min y) and top of the head (max z) agree
    # within a few mm (the x extent differs: ears are lost in the PET blur)
    from faceaudit.petct.surface import extract_head_surface

    boxes = [extract_head_surface(v.array, v.spacing, modality=m, origin=v.origin).mesh.bounds
             for v, m in ((ct, "ct"), (pet, "pet"))]
    assert abs(boxes[1][0, 1] - boxes[0][0, 1]) < 5.0
    assert abs(boxes[1][1, 2] - boxes[0][1, 2]) < 5.0


def test_identities_differ_in_the_face():
    base = demo_data.plan_cohort(n=2, seed=3)
    pose = {"rotation_deg": [0, 0, 0], "shift_mm": [0, 0, 0]}
    hu_a, _, _ = demo_data.warp_anatomy(base[0]["identity"], pose)
    hu_b, _, _ = demo_data.warp_anatomy(base[1]["identity"], pose)
    hu_a2, _, _ = demo_data.warp_anatomy(base[0]["identity"], pose)
    np.testing.assert_array_equal(hu_a, hu_a2)
    changed = np.count_nonzero((hu_a > -300) != (hu_b > -300))
    assert changed > 2000                     # voxels that are skin in one face, air in the other


def test_cached_base_anatomy_cannot_be_altered_by_a_caller():
    base = demo_data.base_anatomy()
    assert demo_data.base_anatomy() is base
    for array in (base.hu, base.brain, base.lo):
        with pytest.raises(ValueError):
            array[(0,) * array.ndim] = 1.0


@pytest.mark.slow
def test_demo_ct_renders_are_faces_for_mediapipe(demo_cohort, tmp_path):
    from PIL import Image

    from faceaudit.faces.facemesh import FaceMesh
    from faceaudit.core.images import center_crop
    from faceaudit.petct.reconstruction import run_reconstruction

    out, plan = demo_cohort
    from faceaudit.core.runner import RunSettings

    assert run_reconstruction(out, tmp_path / "rec", run=RunSettings(progress=False)).exit_code == 0
    with FaceMesh() as mesh:
        found = [mesh.detect(center_crop(np.asarray(Image.open(tmp_path / "rec" / "cts" / f"{e['id']}.png")),
                                         208)) is not None for e in plan]
    assert all(found)


def test_an_interrupted_regeneration_leaves_no_done_marker(tmp_path, monkeypatch):
    (tmp_path / "SIMULATED.txt").write_text("an earlier, complete cohort")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_data, "warp_anatomy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo_data.generate_cohort(tmp_path, n=1, seed=0, progress=False)
    assert not (tmp_path / "SIMULATED.txt").exists()
