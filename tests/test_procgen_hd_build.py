"""procgen_hd/build_libenv.py: the source it accepts (checked by content, however packed), the one-line
refusals, and that an up-to-date build is not redone."""

import os
import shutil
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "procgen_hd"))
import build_libenv  # noqa: E402

SCRIPT = os.path.join(REPO, "procgen_hd", "build_libenv.py")
TARBALL = os.path.join(os.path.dirname(REPO), "shared", "third_party", "procgen-hd-30a146f155f0.tar.xz")
needs_tarball = pytest.mark.skipif(not os.path.isfile(TARBALL), reason="the offline copy of the fork is not beside the repo")


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fork")
    with tarfile.open(TARBALL) as archive:
        archive.extractall(folder, filter="data")
    return str(folder)


@needs_tarball
def test_the_offline_tarball_and_its_unpacked_folder_are_the_pinned_commit(unpacked, tmp_path, monkeypatch):
    for source in (TARBALL, unpacked):
        monkeypatch.setenv("PROCGEN_HD_SOURCE", source)
        work = tmp_path / os.path.basename(source)
        work.mkdir()
        root = build_libenv.fetch_source(str(work))
        assert os.path.isfile(os.path.join(root, "procgen", "src", "vecgame.cpp"))


@needs_tarball
def test_a_changed_source_file_is_refused(unpacked, tmp_path, monkeypatch):
    tampered = tmp_path / "tampered"
    shutil.copytree(unpacked, tampered)
    game = next(tampered.glob("*/procgen/src/game.cpp"))
    game.write_text(game.read_text() + "\n// changed\n")
    monkeypatch.setenv("PROCGEN_HD_SOURCE", str(tampered))
    with pytest.raises(build_libenv.BuildError, match="is not Procgen-HD at 30a146f155f0"):
        build_libenv.fetch_source(str(tmp_path))


def test_a_source_that_is_no_fork_is_refused(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("hello")
    cases = ((tmp_path, "holds no procgen/CMakeLists.txt"), (tmp_path / "notes.txt", "neither a folder nor a tarball"))
    for source, message in cases:
        monkeypatch.setenv("PROCGEN_HD_SOURCE", str(source))
        with pytest.raises(build_libenv.BuildError, match=message):
            build_libenv.fetch_source(str(tmp_path))


def test_an_unreachable_repository_names_procgen_hd_source(tmp_path, monkeypatch):
    monkeypatch.delenv("PROCGEN_HD_SOURCE", raising=False)
    monkeypatch.setattr(build_libenv, "REPOSITORY", str(tmp_path / "no-such-repository"))
    with pytest.raises(build_libenv.BuildError, match="set PROCGEN_HD_SOURCE to a tarball or folder"):
        build_libenv.fetch_source(str(tmp_path / "work"))


def test_an_up_to_date_build_is_not_redone():
    result = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "procgen_hd: libenv of Procgen-HD 30a146f155f0 is up to date\n"


def test_a_missing_build_tool_stops_with_one_line_naming_what_to_install(tmp_path):
    no_tools = dict(os.environ, PATH=str(tmp_path))
    result = subprocess.run([sys.executable, SCRIPT, "--force"], capture_output=True, text=True, env=no_tools, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: building Procgen-HD needs cmake, make, g++ (apt-get install cmake make g++ qtbase5-dev)\n"
