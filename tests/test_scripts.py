"""The six stage scripts share one contract: bad common options are exit 2 with one line
naming the option, never a traceback, and every script is also an installed command."""

import pytest

from conftest import load_script

SCRIPTS = {
    "perform_morphological_reconstruction": ["--petct_path", "{tmp}", "--save_dir", "{tmp}/o"],
    "perform_crossval": ["--ct_files", "{tmp}", "--pet_files", "{tmp}", "--save_perfs_dir", "{tmp}/o"],
    "perform_landmark_placement": ["--ct_files", "{tmp}", "--pet_files", "{tmp}", "--splits_file",
                                   "{tmp}/s.json", "--save_dir", "{tmp}/o"],
    "perform_landmark_matching": ["--landmarks_files", "{tmp}", "--save_dir", "{tmp}/o"],
    "run_digital_mask": ["--input_dir", "{tmp}", "--save_dir", "{tmp}/o"],
    "run_face_recognition": ["--masks_dir", "{tmp}", "--save_dir", "{tmp}/o"],
}


def _argv(name, tmp_path, *extra):
    return [a.format(tmp=tmp_path) for a in SCRIPTS[name]] + list(extra)


#: stages whose items are folds trained or scored one after another take no --jobs
WITHOUT_JOBS = {"perform_crossval", "perform_landmark_matching"}


@pytest.mark.parametrize("name, flag, value", [(name, "--seed", "-1") for name in sorted(SCRIPTS)]
                         + [(name, "--jobs", "0") for name in sorted(SCRIPTS) if name not in WITHOUT_JOBS])
def test_bad_common_options_are_exit_2_naming_the_option(name, flag, value, tmp_path, capsys):
    module = load_script(name)
    code = module.main(_argv(name, tmp_path, flag, value))
    err = capsys.readouterr().err
    assert code == 2
    assert f"expected {flag} to be a whole number >= " in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_stage_is_an_installed_command(name):
    from importlib.metadata import entry_points

    targets = {ep.value for ep in entry_points(group="console_scripts") if ep.name.startswith("faceaudit-")}
    assert f"faceaudit.scripts.{name}:main" in targets
