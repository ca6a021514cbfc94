"""Build the carry bundle for the lent GPU machine: everything it lacks, in one .tar.xz (REFERENCE §9).

    .venv/bin/python benchmark/gpu_carry.py          # -> .carry/bundle.tar.xz (gitignored)

Then every device call names `.carry` in `carry` and runs `benchmark/gpu_evidence.py --bundle
.carry/bundle.tar.xz`, which unpacks it. The machine has Python 3.12, torch, tensorboard, numpy and
matplotlib, but no envpool, gymnasium, tyro, Qt or registry. The bundle holds:

  site/   envpool (its cp312 wheel, trimmed to Atari + DeepMind Control), optree (cp312 wheel), the
          pure-Python packages copied from .venv (gymnasium, tyro, tqdm, ...), envpool_assets (Atari ROMs, DMC
          models without the dog) and procgen_hd (ctypes binding, libenv.so, assets)
  lib/    the shared libraries procgen_hd's libenv.so links beyond glibc, libstdc++ and libglvnd
  debs/   Debian's libglvnd loaders (libegl1, ...) that the NVIDIA EGL needs (device README)
  MANIFEST.json   every file with its size, per part

Downloads (pip, apt-get) are cached in ~/.cache/cleanrl_pool_carry, so a rerun is offline. The bundle and the tracked
files must stay under the 64 MiB that travel: the script fails loudly otherwise.
"""

import argparse
import glob
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAVEL_LIMIT_MIB = 64  # what one device call may carry, working tree included
PURE_PYTHON = ["gymnasium", "Farama-Notifications", "tyro", "tqdm", "docstring_parser", "typeguard", "typing_extensions",
               "dm-env"]
WHEELS = ["envpool", "optree"]  # compiled: their cp312 wheels are downloaded
ENVPOOL_KEEP_SO = {"envpool/atari/atari_envpool.so", "envpool/mujoco/mujoco_dmc_envpool.so"}
ENVPOOL_KEEP_PACKAGES = {"envpool", "envpool/python", "envpool/atari", "envpool/mujoco", "envpool/mujoco/dmc"}
ENVPOOL_STUB = b'"""Trimmed out of this bundle (benchmark/gpu_carry.py): only Atari and DeepMind Control are carried."""\n'
GL_DEBS = ["libegl1", "libglvnd0", "libopengl0", "libgl1", "libglx0", "libgles2"]  # the device README's loaders
# Never carried: the C runtime, the C++ runtime (torch needs the machine's own) and libglvnd (from the debs)
SYSTEM_LIBS = ("linux-vdso", "ld-linux", "libc.so", "libm.so", "libdl.so", "librt.so", "libpthread.so", "libstdc++",
               "libgcc_s", "libGL.so", "libGLX.so", "libGLdispatch", "libEGL", "libOpenGL", "libGLES")


def fail(message: str):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


# What goes in
def envpool_keeps(path: str) -> bool:
    """The trim of EnvPool: its Python core, the libraries its wheel bundles, and the Atari and DMC
    packages with their compiled modules; every other family is dropped (see envpool_stubbed)."""
    if path.startswith(("envpool.libs/", "envpool-")):
        return True
    if "__pycache__" in path or os.path.dirname(path) not in ENVPOOL_KEEP_PACKAGES:
        return False
    return path.endswith((".py", "py.typed")) or path in ENVPOOL_KEEP_SO


def envpool_stubbed(path: str) -> bool:
    """A dropped family's __init__.py (it imports the missing .so) and registration.py (entry.py imports
    it; it may read the family's assets): both become a docstring, so `import envpool` still works."""
    return (path.startswith("envpool/") and os.path.basename(path) in ("__init__.py", "registration.py")
            and os.path.dirname(path) not in ENVPOOL_KEEP_PACKAGES)


def assets_keeps(path: str) -> bool:
    """envpool_assets: Atari ROMs and the DMC models (without the 18 MB dog, which no task here uses)."""
    if "__pycache__" in path or "/dog" in path:
        return False
    kept_folders = ("envpool_assets/atari/", "envpool_assets/mujoco/assets_dmc/")
    return path == "envpool_assets/__init__.py" or path.startswith(kept_folders)


def distribution_files(name: str):
    """(relative path, absolute path) of an installed distribution's files, bytecode left out."""
    dist = importlib.metadata.distribution(name)
    for file in dist.files or []:
        path = str(file)
        if "__pycache__" in path or path.endswith(".pyc") or path.startswith(".."):
            continue
        yield path, str(file.locate())


def carried_libraries(library: str) -> list:
    """(soname, path) of what `ldd library` lists beyond SYSTEM_LIBS; a missing one stops the build."""
    listing = subprocess.run(["ldd", library], capture_output=True, text=True, check=True).stdout
    libraries = []
    for line in listing.splitlines():
        name, _, rest = line.strip().partition(" => ")
        if not rest or name.startswith(SYSTEM_LIBS):
            continue
        path = rest.split(" (")[0].strip()
        if path == "not found":
            fail(f"{library} needs {name}, which this machine lacks (run install.sh)")
        libraries.append((name, path))
    return sorted(libraries)


# Downloads, cached
def download_wheels(cache: str) -> dict:
    """{name: cp312 wheel path}, pip-downloaded once at the versions installed in .venv."""
    os.makedirs(cache, exist_ok=True)
    wheels = {}
    for name in WHEELS:
        version = importlib.metadata.version(name)
        found = glob.glob(os.path.join(cache, f"{name}-{version}-cp312-*.whl"))
        if not found:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                            "--platform", "manylinux_2_27_x86_64", "--platform", "manylinux_2_17_x86_64",
                            "-d", cache, f"{name}=={version}"], check=True)
            found = glob.glob(os.path.join(cache, f"{name}-{version}-cp312-*.whl"))
        if not found:
            fail(f"pip found no cp312 wheel of {name}=={version}")
        wheels[name] = found[0]
    return wheels


def download_debs(cache: str) -> list:
    """The libglvnd loader debs, downloaded once with apt-get into `cache` (the device README's recipe)."""
    os.makedirs(cache, exist_ok=True)
    missing = [name for name in GL_DEBS if not glob.glob(os.path.join(cache, f"{name}_*.deb"))]
    if missing:
        lists = os.path.join(cache, "apt-lists")
        os.makedirs(os.path.join(lists, "partial"), exist_ok=True)
        options = ["-oAPT::Architecture=amd64", "-oAPT::Architectures=amd64", f"-oDir::State::Lists={lists}"]
        subprocess.run(["apt-get", *options, "update", "-qq"], check=True)
        subprocess.run(["apt-get", *options, "download", *missing], cwd=cache, check=True, capture_output=True)
    return sorted(glob.glob(os.path.join(cache, "*.deb")))


# Building and checking
def copy_file(source: str, target: str):
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copy2(source, target, follow_symlinks=True)


def write_stub(target: str):
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "wb") as f:
        f.write(ENVPOOL_STUB)


def stage_bundle(stage: str, cache: str) -> dict:
    """Fill `stage` with site/, lib/ and debs/; returns the manifest {part: {path: bytes}}."""
    site = os.path.join(stage, "site")
    manifest = {"site": {}, "lib": {}, "debs": {}}
    for name, wheel in download_wheels(os.path.join(cache, "wheels")).items():
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if name != "envpool" or envpool_keeps(member):
                    archive.extract(member, site)
                if name == "envpool" and envpool_stubbed(member):
                    write_stub(os.path.join(site, member))
    for name in PURE_PYTHON + ["envpool-assets", "procgen_hd"]:
        for relative, absolute in distribution_files(name):
            if name == "envpool-assets" and not (assets_keeps(relative) or ".dist-info/" in relative):
                continue
            if relative.endswith(".so") and name != "procgen_hd":
                fail(f"{name} is not pure Python ({relative}): add its cp312 wheel to WHEELS")
            copy_file(absolute, os.path.join(site, relative))
    libenv = os.path.join(site, "procgen_hd", "libenv.so")
    if shutil.which("strip"):  # its debug info is most of its 15 MB; the code is unchanged
        subprocess.run(["strip", "--strip-debug", libenv], check=True)
    for soname, path in carried_libraries(libenv):
        copy_file(path, os.path.join(stage, "lib", soname))
    for deb in download_debs(os.path.join(cache, "debs")):
        copy_file(deb, os.path.join(stage, "debs", os.path.basename(deb)))
    for part in manifest:
        root = os.path.join(stage, part)
        for folder, _, files in os.walk(root):
            for file in files:
                path = os.path.join(folder, file)
                manifest[part][os.path.relpath(path, root)] = os.path.getsize(path)
    return manifest


def check_trimmed_envpool(check_dir: str):
    """Apply the same trim to the cp311 EnvPool of .venv and make an Atari and a DMC env from it
    (Python 3.12 is not here: the cp312 copy is checked on the device by gpu_evidence.py)."""
    for name, keeps in (("envpool", envpool_keeps), ("envpool-assets", assets_keeps)):
        for relative, absolute in distribution_files(name):
            if keeps(relative):
                copy_file(absolute, os.path.join(check_dir, relative))
            if name == "envpool" and envpool_stubbed(relative):
                write_stub(os.path.join(check_dir, relative))
    code = ("import envpool, sys; assert envpool.__file__.startswith(sys.argv[1]), envpool.__file__; "
            "envpool.make('Breakout-v5', env_type='gymnasium', num_envs=1).reset(); "
            "envpool.make('CartpoleSwingup-v1', env_type='gymnasium', num_envs=1).reset(); print('trimmed envpool ok')")
    env = dict(os.environ, PYTHONPATH=check_dir + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code, check_dir], env=env, capture_output=True, text=True)
    if result.returncode:
        fail(f"the trimmed EnvPool does not work: {result.stderr.strip().splitlines()[-1]}")


def tracked_bytes() -> int:
    """Bytes of the git-tracked files, which travel with the bundle."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    paths = [os.path.join(REPO, name) for name in names.split("\0") if name]
    return sum(os.path.getsize(path) for path in paths if os.path.isfile(path))


def check_size(bundle_bytes: int, tree_bytes: int, limit_mib: float = TRAVEL_LIMIT_MIB):
    """Stop (exit 1) when the bundle and the tracked files together exceed what one call may carry."""
    total_mib = (bundle_bytes + tree_bytes) / 2**20
    if total_mib > limit_mib:
        print(f"error: bundle {bundle_bytes / 2**20:.1f} MiB + tracked files {tree_bytes / 2**20:.1f} MiB = "
              f"{total_mib:.1f} MiB, over the {limit_mib} MiB a device call carries", file=sys.stderr)
        sys.exit(1)
    return total_mib


def summary_lines(manifest: dict) -> list:
    """One line per part and per top-level package: files and uncompressed MiB."""
    lines = []
    for part, files in manifest.items():
        groups = {}
        for path, size in files.items():
            top = path.split("/")[0] if part == "site" else part
            count, total = groups.get(top, (0, 0))
            groups[top] = (count + 1, total + size)
        for top, (count, total) in sorted(groups.items(), key=lambda item: -item[1][1]):
            lines.append(f"  {part:5s} {top:40s} {count:5d} files {total / 2**20:8.2f} MiB")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO, ".carry", "bundle.tar.xz"), help="the bundle to write")
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "cleanrl_pool_carry"),
                        help="where downloads are kept (outside .carry, which travels whole)")
    parser.add_argument("--limit-mib", type=float, default=TRAVEL_LIMIT_MIB, help="bundle + tracked files must fit")
    args = parser.parse_args(argv)
    if not args.out.endswith(".tar.xz"):
        fail(f"--out {args.out!r} must end in .tar.xz")
    if not args.limit_mib > 0:
        fail(f"--limit-mib {args.limit_mib} must be positive")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if not os.access(os.path.dirname(os.path.abspath(args.out)), os.W_OK):
        fail(f"--out {args.out!r} is in a folder this user cannot write")

    # Stage, check, pack, measure
    with tempfile.TemporaryDirectory() as work:
        stage = os.path.join(work, "bundle")
        manifest = stage_bundle(stage, args.cache)
        with open(os.path.join(stage, "MANIFEST.json"), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
        check_trimmed_envpool(os.path.join(work, "check"))
        partial = args.out + ".tmp"
        with tarfile.open(partial, "w:xz", preset=6) as archive:
            for entry in sorted(os.listdir(stage)):
                archive.add(os.path.join(stage, entry), arcname=entry)
        os.replace(partial, args.out)
    print("\n".join(summary_lines(manifest)))
    bundle_bytes = os.path.getsize(args.out)
    total_mib = check_size(bundle_bytes, tracked_bytes(), args.limit_mib)
    print(f"wrote {args.out}: {bundle_bytes / 2**20:.1f} MiB "
          f"({total_mib:.1f} MiB with the tracked files, limit {args.limit_mib})")


if __name__ == "__main__":
    main()
