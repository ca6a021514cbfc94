"""Build the Procgen-HD fork's C library (libenv) and stage it, with the fork's assets, into the
`procgen_hd` package, so that `pip install ./procgen_hd` installs a working environment.

    python procgen_hd/build_libenv.py          # from the repository root; install.sh runs it
    python procgen_hd/build_libenv.py --force  # rebuild even when the staged library is up to date

Source: `$PROCGEN_HD_SOURCE` (a tarball or a folder of github.com/raphajaner/procgen-hd at the pinned
commit) when set, otherwise a shallow git fetch of that exact commit. Either way the files the build
reads are checked against a content hash of that commit. `libenv.h` (the C API, not in the fork)
comes from the `gym3==0.3.3` wheel, downloaded with pip but never installed (its pins conflict with
EnvPool's), and is checked by its SHA-256. Compiled for any x86-64 since Ivy Bridge (the fork's
`PROCGEN_PACKAGE` flags), so a library built here runs on a GPU server too. An up-to-date build is
not redone. Standard library only.
"""

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

COMMIT = "30a146f155f0a7272e9996724b0adb2c90126439"
REPOSITORY = "https://github.com/raphajaner/procgen-hd.git"
# SHA-256 over the sorted (path, file SHA-256) lines of procgen/CMakeLists.txt, procgen/src/ and procgen/data/assets/
SOURCE_CONTENT_SHA256 = "1e502c9599859532ff73e2678bea57509d7bfbe2ae2086c2a579817be8f9655f"
GYM3_WHEEL = "gym3==0.3.3"
LIBENV_H_SHA256 = "95b210d417e38a31e2470d9cbbda86cef2a5a489d589c8fba8e6342f8ef2bfcc"
HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE_DIR = os.path.join(HERE, "src", "procgen_hd")
BUILD_DIR = os.path.join(HERE, "build")
TOOLS = {"cmake": "cmake", "make": "make", "g++": "g++"}  # command: Debian package


class BuildError(Exception):
    """A missing tool or source, or a failed build: one line for the user."""


def cmake_flags() -> list:
    flags = ["-DCMAKE_BUILD_TYPE=RelWithDebInfo", "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O2 -DNDEBUG"]  # no -g: 0.6 MB, not 15
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-DPROCGEN_PACKAGE=ON")  # -march=ivybridge (the fork's default is -march=native)
    return flags


def build_key() -> dict:
    """What the staged library was built from; a build with the same key is up to date."""
    return {"commit": COMMIT, "source_content_sha256": SOURCE_CONTENT_SHA256, "libenv_h_sha256": LIBENV_H_SHA256,
            "cmake_flags": cmake_flags(), "machine": platform.machine()}


def content_sha256(root: str) -> str:
    """Hash of the files the build reads, independent of how the source was packed."""
    lines = []
    for top in ("procgen/CMakeLists.txt", "procgen/src", "procgen/data/assets"):
        path = os.path.join(root, top)
        files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
        for file in files:
            with open(file, "rb") as f:
                lines.append(f"{os.path.relpath(file, root)} {hashlib.sha256(f.read()).hexdigest()}")
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()


def source_root(unpacked: str) -> str:
    """The folder that holds `procgen/CMakeLists.txt`: the given one or its single subfolder (an archive's prefix)."""
    if os.path.isfile(os.path.join(unpacked, "procgen", "CMakeLists.txt")):
        return unpacked
    entries = [os.path.join(unpacked, e) for e in os.listdir(unpacked)]
    if len(entries) == 1 and os.path.isfile(os.path.join(entries[0], "procgen", "CMakeLists.txt")):
        return entries[0]
    raise BuildError(f"{unpacked} holds no procgen/CMakeLists.txt: not a source tree of {REPOSITORY}")


def fetch_source(work: str) -> str:
    """The fork's source tree at COMMIT, checked: from $PROCGEN_HD_SOURCE, else from GitHub."""
    given = os.environ.get("PROCGEN_HD_SOURCE")
    if given:
        if os.path.isdir(given):
            root = source_root(given)
        elif os.path.isfile(given) and tarfile.is_tarfile(given):
            with tarfile.open(given) as archive:
                safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4
                archive.extractall(os.path.join(work, "source"), **safe)
            root = source_root(os.path.join(work, "source"))
        else:
            raise BuildError(f"PROCGEN_HD_SOURCE={given!r} is neither a folder nor a tarball")
        where = f"PROCGEN_HD_SOURCE={given}"
    else:
        if shutil.which("git") is None:
            raise BuildError("git is needed to fetch Procgen-HD (apt-get install git), "
                             "or set PROCGEN_HD_SOURCE to a tarball or folder of the fork")
        root = os.path.join(work, "source")
        commands = [["git", "init", "-q", root], ["git", "-C", root, "fetch", "-q", "--depth", "1", REPOSITORY, COMMIT],
                    ["git", "-C", root, "checkout", "-q", "FETCH_HEAD"]]
        for command in commands:
            if subprocess.run(command, capture_output=True).returncode != 0:
                raise BuildError(f"could not fetch {REPOSITORY} at {COMMIT} (offline?); "
                                 "set PROCGEN_HD_SOURCE to a tarball or folder of the fork at that commit")
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        if head != COMMIT:
            raise BuildError(f"git fetched {head}, not the pinned commit {COMMIT}")
        where = REPOSITORY
    found = content_sha256(root)
    if found != SOURCE_CONTENT_SHA256:
        raise BuildError(f"the source from {where} is not Procgen-HD at {COMMIT[:12]} (content hash {found[:12]}, "
                         f"expected {SOURCE_CONTENT_SHA256[:12]})")
    return root


def fetch_libenv_header(work: str) -> str:
    """Folder holding gym3 0.3.3's libenv.h, taken out of the wheel (pip download, not install)."""
    wheels = os.path.join(work, "wheel")
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", wheels, GYM3_WHEEL]
    if subprocess.run(command, capture_output=True).returncode != 0:
        raise BuildError(f"could not download the {GYM3_WHEEL} wheel with pip (it holds libenv.h, the C API)")
    with zipfile.ZipFile(os.path.join(wheels, os.listdir(wheels)[0])) as wheel:
        header = wheel.read("gym3/libenv.h")
    if hashlib.sha256(header).hexdigest() != LIBENV_H_SHA256:
        raise BuildError(f"gym3/libenv.h in the downloaded {GYM3_WHEEL} wheel has an unexpected SHA-256")
    include = os.path.join(work, "include")
    os.makedirs(include)
    with open(os.path.join(include, "libenv.h"), "wb") as f:
        f.write(header)
    return include


def compile_library(root: str, include: str, work: str) -> str:
    log_path = os.path.join(BUILD_DIR, "build.log")
    cmake_dir = os.path.join(work, "cmake")
    jobs = str(len(os.sched_getaffinity(0)))
    with open(log_path, "w") as log:
        configure = ["cmake", "-S", os.path.join(root, "procgen"), "-B", cmake_dir, f"-DLIBENV_DIR={include}", *cmake_flags()]
        for command in (configure, ["cmake", "--build", cmake_dir, "-j", jobs]):
            if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
                with open(log_path) as f:
                    needs_qt = "Qt5" in f.read()
                hint = " (Qt 5 headers missing: apt-get install qtbase5-dev)" if needs_qt else ""
                raise BuildError(f"building libenv failed{hint}; see {log_path}")
    return os.path.join(cmake_dir, "libenv.so")


def stage(library: str, root: str):
    """Copy the library and the fork's assets into the package, then record what they were built from."""
    shutil.copy2(library, os.path.join(PACKAGE_DIR, "libenv.so"))
    assets = os.path.join(PACKAGE_DIR, "assets")
    shutil.rmtree(assets, ignore_errors=True)
    shutil.copytree(os.path.join(root, "procgen", "data", "assets"), assets)
    with open(os.path.join(PACKAGE_DIR, "build_info.json"), "w") as f:
        json.dump(build_key(), f, indent=2, sort_keys=True)


def is_up_to_date() -> bool:
    try:
        with open(os.path.join(PACKAGE_DIR, "build_info.json")) as f:
            staged = json.load(f)
    except (OSError, ValueError):
        return False
    return staged == build_key() and os.path.isfile(os.path.join(PACKAGE_DIR, "libenv.so"))


def build(force: bool = False):
    if not force and is_up_to_date():
        print(f"procgen_hd: libenv of Procgen-HD {COMMIT[:12]} is up to date")
        return
    missing = [package for command, package in TOOLS.items() if shutil.which(command) is None]
    if missing:
        raise BuildError(f"building Procgen-HD needs {', '.join(missing)} (apt-get install {' '.join(missing)} qtbase5-dev)")
    os.makedirs(BUILD_DIR, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=BUILD_DIR) as work:
        root = fetch_source(work)
        library = compile_library(root, fetch_libenv_header(work), work)
        stage(library, root)
    print(f"procgen_hd: built libenv of Procgen-HD {COMMIT[:12]} into {PACKAGE_DIR}")


if __name__ == "__main__":
    try:
        build(force="--force" in sys.argv[1:])
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
