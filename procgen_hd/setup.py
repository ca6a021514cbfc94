"""Refuses to package a procgen_hd without its library: build it first (procgen_hd/build_libenv.py). The wheel holds
libenv.so, so it is tagged for this platform (py3-none-linux_x86_64): any Python 3, since the binding is ctypes."""

import os
import sys

from setuptools import Distribution, setup
from setuptools.command.bdist_wheel import bdist_wheel


class LibraryDistribution(Distribution):
    def has_ext_modules(self):
        return True  # libenv.so inside: a platform wheel, not py3-none-any


class PlatformWheel(bdist_wheel):
    def get_tag(self):
        return "py3", "none", super().get_tag()[2]  # no Python extension: any Python 3 on this platform


if not os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), "src", "procgen_hd", "libenv.so")):
    sys.exit("error: procgen_hd's libenv.so is not built: run `python procgen_hd/build_libenv.py` first "
             "(PROCGEN_HD_SOURCE=<tarball or folder of the fork> where GitHub cannot be reached)")
setup(distclass=LibraryDistribution, cmdclass={"bdist_wheel": PlatformWheel})
