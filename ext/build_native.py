"""cffi builder (out-of-line API mode) for mirrord's C data path: ``mirrord._native``.

Each area has its own header in ext/; this file lists them once for cdef and
once for compilation, so adding an area means adding its header here.
"""

from __future__ import annotations

import pathlib
import subprocess

from cffi import FFI

# setuptools wants paths relative to the project root, where setup.py runs.
HERE = pathlib.Path("ext")

CDEF = """
uint32_t mrd_crc32c(uint32_t crc, const void *buf, size_t len);
"""

SOURCES = ["crc32c.c"]


def _pkg_config(*args: str) -> list[str]:
    out = subprocess.run(["pkg-config", *args, "fuse3"], capture_output=True, text=True, check=True)
    return out.stdout.split()


ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "mirrord._native",
    '#include "crc32c.h"\n',
    sources=[str(HERE / s) for s in SOURCES],
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-Wall", "-D_FILE_OFFSET_BITS=64"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
