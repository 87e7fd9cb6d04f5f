"""bench/device_check.sh without a GPU, as on the lent machine: fusedlora is built in place there, not
installed, so each Python command the script runs must find the package through the environment the script
sets up. The script runs with a stand-in Python that records every command (argv, working directory,
PYTHONPATH) and succeeds; then each recorded bench command runs for real, with the editable install of this
venv hidden, and must get as far as its own check for a GPU."""

import json
import os
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Hides this venv's editable install of fusedlora (setuptools' finder on sys.meta_path, installed by a .pth
# before sitecustomize runs), so the package is importable only the way the GPU machine finds it.
HIDE_EDITABLE = """import sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, "__module__", "").startswith("__editable__")]
"""


def _recorded_commands(tmp_path) -> list[dict]:
    log = tmp_path / "calls.jsonl"
    stub = tmp_path / "python"
    stub.write_text(
        f"#!/bin/sh\nexec {sys.executable} -c 'import json, os, sys; "
        f"open(sys.argv[1], \"a\").write(json.dumps({{\"argv\": sys.argv[2:], \"cwd\": os.getcwd(), "
        f"\"pythonpath\": os.environ.get(\"PYTHONPATH\", \"\")}}) + \"\\n\")' {log} \"$@\"\n")
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(PYTHON=str(stub), OUT=str(tmp_path / "out"))
    done = subprocess.run(["bash", os.path.join(ROOT, "bench", "device_check.sh")], env=env, timeout=120,
                          capture_output=True, text=True)
    assert "device_check status" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.slow
def test_every_bench_command_finds_the_package_without_an_install(tmp_path):
    calls = _recorded_commands(tmp_path)
    benches = [c for c in calls if c["argv"] and c["argv"][0].startswith("bench/")]
    assert sorted(os.path.basename(c["argv"][0]) for c in benches) == [
        "bench_cutover.py", "bench_decode.py", "bench_dequant.py", "bench_layer.py", "bench_step.py",
        "merge_results.py"]
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(HIDE_EDITABLE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(hide))
    # the harness hides the install: without the script's PYTHONPATH the package is not found
    plain = subprocess.run([sys.executable, "bench/bench_layer.py"], cwd=ROOT, env=env, timeout=120,
                           capture_output=True, text=True)
    assert "No module named 'fusedlora'" in plain.stderr, plain.stderr[-2000:]
    for call in benches:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (call["pythonpath"], str(hide)) if p)
        done = subprocess.run([sys.executable, *call["argv"]], cwd=call["cwd"], env=env, timeout=120,
                              capture_output=True, text=True)
        out = done.stdout + done.stderr
        assert "Error" not in out.replace("no CUDA", ""), (call["argv"], out[-3000:])
        if call["argv"][0] == "bench/merge_results.py":  # reads the benches' files: none here
            assert "missing" in out and done.returncode != 0, out[-2000:]
        else:
            assert "needs a CUDA GPU" in out and done.returncode != 0, (call["argv"], out[-2000:])
