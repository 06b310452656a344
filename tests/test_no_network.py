"""Nothing leaves the machine: a stage that runs onnxruntime (RetinaFace in the digital-mask
stage) is run with its network namespace removed and every network system call traced."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ORL, REPO_ROOT


def test_the_package_turns_onnxruntime_telemetry_off_before_onnxruntime_loads():
    code = ("import faceaudit, os, sys; assert 'onnxruntime' not in sys.modules; "
            "print(os.environ['ORT_DISABLE_TELEMETRY'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


@pytest.mark.slow
def test_a_digital_mask_run_makes_no_network_call(tmp_path):
    strace, unshare = shutil.which("strace"), shutil.which("unshare")
    if strace is None or unshare is None:
        pytest.skip("needs strace and unshare (util-linux) to watch system calls")
    if subprocess.run([unshare, "-rn", "true"], capture_output=True).returncode != 0:
        pytest.skip("this machine does not allow a private network namespace (unshare -rn)")
    photos = tmp_path / "photos"
    for identity in ("s1", "s2"):
        (photos / identity).mkdir(parents=True)
        for k in (1, 2):
            shutil.copy(ORL / identity / f"{k}.pgm", photos / identity / f"{k}.pgm")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    env["HOME"] = str(home)
    log = tmp_path / "strace.log"
    cmd = [unshare, "-rn", strace, "-f", "-qq", "-e", "trace=socket,connect,sendto,sendmsg",
           "-o", str(log), sys.executable, str(REPO_ROOT / "run_digital_mask.py"),
           "--input_dir", str(photos), "--save_dir", str(tmp_path / "out"), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    assert (tmp_path / "out" / "manifest.csv").is_file()
    calls = log.read_text(encoding="utf-8")
    internet = [line for line in calls.splitlines() if re.search(r"AF_INET6?\b", line)]
    assert internet == [], "network calls:\n" + "\n".join(internet[:20])
    assert not (home / ".cache" / "Microsoft").exists()   # onnxruntime's telemetry queue
