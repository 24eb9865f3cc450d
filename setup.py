# cffi cannot be declared in pyproject.toml alone: this file only names the
# out-of-line API module that setuptools must compile (ext/build_native.py).
from setuptools import setup

setup(cffi_modules=["ext/build_native.py:ffibuilder"])
