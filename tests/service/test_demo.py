"""``lethe demo`` on a LETHE_HOME with nothing configured: it forgets a digit end to end."""

import os
import shutil
import subprocess
import sys

from tests.service_fixtures import free_port


def test_the_demo_forgets_a_digit_and_reports_the_new_version(tmp_path, digits, digits_model):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LETHE_")}
    env["LETHE_HOME"] = str(tmp_path / "var")
    # The session's digits and their model where the demo builds its own (service.demo.build_demo_model
    # writes the same data set and trains the same recipe, as the fixtures do): the demo's first
    # minute is that training, which every other model-based test already runs.
    shutil.copytree(digits.root, tmp_path / "var" / "demo" / "data")
    shutil.copytree(digits_model, tmp_path / "var" / "demo" / "model")
    done = subprocess.run([sys.executable, "-m", "service.cli", "demo", "--exit-when-done", "--port", str(free_port()),
                           "--timeout", "300"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "training the demo ViT" not in out  # it took the model it found
    assert "request status: propagated" in out
    assert "forget-set accuracy of digit 3:" in out and "held-out Acc_r" in out
    assert "current version: 2, sha256 " in out
    assert (tmp_path / "var" / "demo" / "model" / "model.safetensors").is_file()
