"""The simulated demo cohort: layout, labelling, reproducibility, anatomy, faces, sessions,
hard cases."""

import gzip
import hashlib
import json
import os

import numpy as np
import pytest

from faceaudit.demo import cohort as demo_data
from faceaudit.demo import face_shapes, hard_cases
from faceaudit.petct.volumes import discover_studies, load_volume

ZERO_POSE = {"rotation_deg": [0, 0, 0], "shift_mm": [0, 0, 0]}


@pytest.fixture(scope="module")
def demo_cohort(tmp_path_factory):
    """Two patients, three studies: the first patient (ORL s23) has one study with padding,
    the second (ORL s5) two sessions."""
    out = tmp_path_factory.mktemp("demo")
    plan = demo_data.generate_cohort(out, n=2, seed=6, second_study_fraction=0.5, hard_cases=("padding",),
                                     progress=False)
    return out, plan


def _identity(person: int) -> dict:
    return {"orl": [person], "weights": [1.0], "scale_xyz": [1.0, 1.0, 1.0], "body_scale": 1.0,
            "brain_suv": 8.0}


def test_plan_is_reproducible_and_seeded():
    a = demo_data.plan_cohort(n=6, seed=0)
    assert a == demo_data.plan_cohort(n=6, seed=0)
    assert a != demo_data.plan_cohort(n=6, seed=1)
    assert len({e["patient"] for e in a}) == 6


def test_plan_records_sessions_with_their_own_pose():
    plan = demo_data.plan_cohort(n=12, seed=0, second_study_fraction=1.0)
    assert len(plan) == 24 and len({e["id"] for e in plan}) == 24
    for first, second in zip(plan[::2], plan[1::2]):
        assert first["patient"] == second["patient"] and first["identity"] == second["identity"]
        assert (first["session"], second["session"]) == (1, 2)
        assert first["n_sessions"] == second["n_sessions"] == 2
        assert first["pose"] != second["pose"]
        month, day, year = first["study"].split("-")[:3]
        month2, day2, year2 = second["study"].split("-")[:3]
        assert (year, month, day) <= (year2, month2, day2)        # sessions in date order
    single = demo_data.plan_cohort(n=5, seed=0, second_study_fraction=0.0)
    assert all(e["session"] == 1 and e["n_sessions"] == 1 for e in single)


def test_patients_get_distinct_orl_people_then_mixes():
    plan = demo_data.plan_cohort(n=43, seed=2, second_study_fraction=0.0)
    identities = [e["identity"] for e in plan]
    singles = [i["orl"][0] for i in identities[:40]]
    assert sorted(singles) == list(range(40))
    assert all(i["weights"] == [1.0] and i["orl_people"] == [f"s{i['orl'][0] + 1}"] for i in identities[:40])
    for mixed in identities[40:]:
        assert len(mixed["orl"]) == 2 and mixed["orl"][0] != mixed["orl"][1]
        assert abs(sum(mixed["weights"]) - 1.0) < 1e-9 and min(mixed["weights"]) >= 0.34


def test_hard_cases_are_planned_per_study_and_default_to_all():
    default = demo_data.plan_cohort(n=10, seed=0, hard_cases=("padding",))
    assert {c for e in default for c in e["hard_cases"]} == {"padding"}
    everything = demo_data.plan_cohort(n=10, seed=0, hard_case_fraction=0.2)
    assert {c for e in everything for c in e["hard_cases"]} == set(hard_cases.HARD_CASES)
    for case in hard_cases.HARD_CASES:
        assert sum(case in e["hard_cases"] for e in everything) == round(0.2 * len(everything))
    # only the hard cases change with the option, every other choice stays
    strip = [{k: v for k, v in e.items() if k != "hard_cases"} for e in everything]
    assert strip == [{k: v for k, v in e.items() if k != "hard_cases"} for e in default]
    assert all(e["hard_cases"] == [] for e in demo_data.plan_cohort(n=4, seed=0, hard_cases=()))
    assert hard_cases.parse_hard_cases("arms_up, padding") == ("arms_up", "padding")
    assert hard_cases.parse_hard_cases("none") == ()
    assert hard_cases.parse_hard_cases("all") == hard_cases.HARD_CASES
    with pytest.raises(ValueError, match="expected hard cases among"):
        hard_cases.parse_hard_cases("padding,tilt")
    with pytest.raises(SystemExit) as exit_info:
        demo_data.main(["unused", "--hard-cases", "tilt"])
    assert exit_info.value.code == 2


def test_cohort_layout_and_simulated_labels(demo_cohort):
    out, plan = demo_cohort
    studies = discover_studies(out)
    assert [s.id for s in studies] == sorted(e["id"] for e in plan)
    assert all(s.ct.name == "CTres.nii.gz" and s.pet.name == "SUV.nii.gz" for s in studies)
    for name in ("SIMULATED.txt", "README.md"):
        text = (out / name).read_text(encoding="utf-8")
        assert "SIMULATED" in text and "simulated from 40 real face shapes" in text
    record = json.loads((out / "cohort.json").read_text(encoding="utf-8"))
    assert record["simulated"] is True and record["studies"] == json.loads(json.dumps(plan))
    assert record["n_patients_two_sessions"] == 1 and record["hard_cases"] == ["padding"]
    with gzip.open(studies[0].ct, "rb") as fh:
        header = fh.read(348)
    assert header[148:228].rstrip(b"\0").decode() == demo_data.SIMULATED_NOTE
    for path in (out, studies[0].ct.parent.parent, studies[0].ct.parent):
        assert os.stat(path).st_mode & 0o777 == 0o700, path
    assert os.stat(studies[0].ct).st_mode & 0o777 == 0o600


def test_same_seed_writes_the_same_bytes(tmp_path):
    def digests(folder):
        demo_data.generate_cohort(folder, n=1, seed=11, progress=False)
        return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    first, second = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert first == second and any(name.endswith("CTres.nii.gz") for name in first)


def test_ct_and_pet_are_realistic_and_share_the_pose(demo_cohort):
    out, plan = demo_cohort
    entry = next(e for e in plan if not e["hard_cases"])
    study = next(s for s in discover_studies(out) if s.id == entry["id"])
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


def test_orl_face_shapes_are_forty_people_cached_and_read_only():
    shapes, names = face_shapes.orl_identity_shapes()
    assert shapes.shape == (40, 478, 3) and names[:3] == ("s1", "s2", "s3")
    assert face_shapes.orl_identity_shapes()[0] is shapes
    np.testing.assert_allclose([face_shapes.inter_ocular_3d(s) for s in shapes], 1.0, atol=1e-9)
    deviations = face_shapes.identity_deviations()
    for array in (shapes, deviations, face_shapes.base_face_landmarks()):
        with pytest.raises(ValueError):
            array[0, 0, 0] = 1.0
    np.testing.assert_allclose(deviations.mean(axis=0), 0.0, atol=1e-9)
    rms = np.sqrt((deviations[:, :468] ** 2).sum(-1).mean(-1))
    assert np.all((rms > 0.5) & (rms < 10.0))           # mm: faces differ by millimetres


def test_face_warp_carries_the_person_onto_the_base_face():
    base = face_shapes.base_face_landmarks()[:468]
    assert 50.0 < face_shapes.inter_ocular_3d(face_shapes.base_face_landmarks()) < 75.0
    deviation = face_shapes.identity_deviations()[4, :468]
    # a moved landmark maps back (backward warp) onto its base-face point
    back = demo_data.to_base_frame(base + deviation, _identity(4), ZERO_POSE)
    assert np.sqrt(((back - base) ** 2).sum(1).mean()) < 0.1 * np.sqrt((deviation ** 2).sum(1).mean())
    # far from the face (back of the skull, torso) the warp is faded out entirely
    far = np.array([[99.0, 190.0, 120.0], [99.0, 150.0, -50.0], [20.0, 180.0, 150.0]])
    np.testing.assert_allclose(demo_data.to_base_frame(far, _identity(4), ZERO_POSE), far, atol=1e-6)


def test_identities_differ_in_the_face_not_in_the_back_of_the_head():
    a = demo_data.warp_anatomy(_identity(0), ZERO_POSE)
    b = demo_data.warp_anatomy(_identity(1), ZERO_POSE)
    np.testing.assert_array_equal(a.hu, demo_data.warp_anatomy(_identity(0), ZERO_POSE).hu)
    changed = (a.hu > -300) != (b.hu > -300)
    assert np.count_nonzero(changed) > 2000        # voxels that are skin in one face, air in the other
    world_y = a.world_y
    assert not changed[world_y > 170.0].any()      # the back of the head is the shared base


def test_cached_base_anatomy_cannot_be_altered_by_a_caller():
    base = demo_data.base_anatomy()
    assert demo_data.base_anatomy() is base
    for array in (base.hu, base.brain, base.lo):
        with pytest.raises(ValueError):
            array[(0,) * array.ndim] = 1.0


def test_hard_case_volumes(tmp_path):
    import SimpleITK as sitk

    entry = demo_data.plan_cohort(n=1, seed=3, hard_cases=())[0]
    plain_ct, _plain_pet, plain_grid = demo_data.simulate_study(entry)
    ct, pet, grid = demo_data.simulate_study(dict(entry, hard_cases=list(hard_cases.HARD_CASES)))
    # padding: -3024 HU in the field's corners only, never in the PET
    assert ct[0, 0, 0] == hard_cases.PADDING_HU and ct[96, 96, 50] != hard_cases.PADDING_HU
    assert plain_ct.min() >= -1024 and pet.min() >= 0
    # arms up: a taller field, body (CT and PET) above the head's top
    assert grid.shape[2] == plain_grid.shape[2] + hard_cases.ARMS_UP_EXTRA_SLICES
    head_top = np.nonzero((plain_ct > -300).any(axis=(0, 1)))[0].max()
    above = slice(head_top + 5, None)
    assert np.count_nonzero(ct[:, :, above] > -300) > 1000 and pet[:, :, above].max() > 0.5
    # headrest: dense CT voxels the PET does not show (no uptake)
    anatomy = demo_data.warp_anatomy(entry["identity"], entry["pose"], ["headrest"])
    rest = anatomy.headrest & (anatomy.hu < -300)
    assert np.count_nonzero(rest) > 500
    # oblique: stored with 10-degree direction cosines
    demo_data._write_nifti(tmp_path / "ct.nii.gz", ct, grid)
    direction = np.array(sitk.ReadImage(str(tmp_path / "ct.nii.gz")).GetDirection()).reshape(3, 3)
    tilt = np.degrees(np.arccos(abs(direction[2, 2])))
    assert abs(tilt - hard_cases.OBLIQUE_TILT_DEG) < 1e-3


def _ct_landmarks(out, plan):
    from PIL import Image

    from faceaudit.core.images import center_crop
    from faceaudit.core.runner import RunSettings
    from faceaudit.petct.landmarks import place_landmarks_batch
    from faceaudit.petct.reconstruction import run_reconstruction

    rec = out.parent / (out.name + "_rec")
    if not (rec / "cts").is_dir():
        assert run_reconstruction(out, rec, run=RunSettings(progress=False)).exit_code == 0
    images = [center_crop(np.asarray(Image.open(rec / "cts" / f"{e['id']}.png")), 208) for e in plan]
    return place_landmarks_batch(images)


@pytest.mark.slow
def test_demo_ct_renders_are_faces_for_mediapipe(demo_cohort):
    out, plan = demo_cohort
    _landmarks, detected = _ct_landmarks(out, plan)
    assert detected.all()


@pytest.mark.slow
def test_two_people_differ_more_than_two_sessions_of_one_patient(demo_cohort):
    from faceaudit.core.geometry import align_to

    out, plan = demo_cohort
    landmarks, detected = _ct_landmarks(out, plan)
    assert detected.all()
    shapes = landmarks[:, :468, :]

    def procrustes_distance(a, b):
        aligned = align_to(a, b, scale=True)
        return np.sqrt(((aligned - b) ** 2).sum(1).mean() / ((b - b.mean(0)) ** 2).sum(1).mean())

    other = next(i for i, e in enumerate(plan) if e["n_sessions"] == 1)
    first, second = (i for i, e in enumerate(plan) if e["n_sessions"] == 2)
    assert plan[first]["identity"]["orl"] != plan[other]["identity"]["orl"]
    same = procrustes_distance(shapes[first], shapes[second])
    assert same < procrustes_distance(shapes[first], shapes[other])
    assert same < procrustes_distance(shapes[second], shapes[other])


def test_an_interrupted_regeneration_leaves_no_done_marker(tmp_path, monkeypatch):
    (tmp_path / "SIMULATED.txt").write_text("an earlier, complete cohort")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_data, "warp_anatomy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo_data.generate_cohort(tmp_path, n=1, seed=0, progress=False)
    assert not (tmp_path / "SIMULATED.txt").exists()
