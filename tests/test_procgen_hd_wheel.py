"""`pip wheel ./procgen_hd` (after build_libenv.py) gives one platform wheel holding libenv.so and the assets, which
installs into a fresh virtual environment and plays there, away from this repository."""

import glob
import os
import subprocess
import sys
import sysconfig
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(folder), os.path.join(REPO, "procgen_hd")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    (path,) = glob.glob(str(folder / "*.whl"))
    return path


def test_the_wheel_is_tagged_for_this_platform_and_holds_the_library_and_assets(wheel):
    platform = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    assert os.path.basename(wheel) == f"procgen_hd-0.1.0-py3-none-{platform}.whl"
    names = zipfile.ZipFile(wheel).namelist()
    assert {"procgen_hd/libenv.so", "procgen_hd/build_info.json", "procgen_hd/gymnasium_env.py"} <= set(names)
    assets = os.path.join(REPO, "procgen_hd", "src", "procgen_hd", "assets")
    staged = sum(len(files) for _, _, files in os.walk(assets))
    assert sum(name.startswith("procgen_hd/assets/") for name in names) == staged > 1000


def test_the_wheel_installs_into_a_fresh_venv_and_plays_a_step(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    install = subprocess.run([python, "-m", "pip", "install", "-q", wheel], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    code = """
import numpy as np, procgen_hd
envs = procgen_hd.ProcgenHDEnv("starpilot", 2, 96)
obs, info = envs.reset()
obs, reward, done, info = envs.step(np.array([1, 4]))
print(procgen_hd.__file__.startswith(sys.prefix), obs.shape, reward.dtype, procgen_hd.BUILD_INFO["commit"][:12])
"""
    played = subprocess.run([python, "-c", "import sys" + code], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path, env={"PATH": os.environ["PATH"]})
    assert played.returncode == 0, played.stderr[-2000:]
    assert played.stdout == "True (2, 3, 96, 96) float32 30a146f155f0\n"
