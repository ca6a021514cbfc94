"""Refuses to package a procgen_hd without its library: build it first (procgen_hd/build_libenv.py)."""

import os
import sys

from setuptools import setup

if not os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), "src", "procgen_hd", "libenv.so")):
    sys.exit("error: procgen_hd's libenv.so is not built: run `python procgen_hd/build_libenv.py` first "
             "(PROCGEN_HD_SOURCE=<tarball or folder of the fork> where GitHub cannot be reached)")
setup()
