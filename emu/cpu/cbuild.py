"""Build the C helper module ``emu.cpu._emuc`` with cffi (``python -m emu.cpu.cbuild``).

The C code is in ``emuc.c`` next to this file; ``emuc.h`` declares its state and functions,
and the part of the header between its cdef markers is cffi's declaration of the module, so
that the two cannot disagree.  Our code is compiled with ``-Wall -Wextra -Werror``: a
warning fails the build.  The Makefile rebuilds the module when either file changes.
"""

import os
import pathlib
import shutil

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
HEADER = HERE / "emuc.h"
SOURCE = HERE / "emuc.c"
BUILD_DIR = HERE.parents[1] / "build" / "cffi"
CDEF_BEGIN = "/* --- cffi cdef begin --- */"
CDEF_END = "/* --- cffi cdef end --- */"
#: our C is held to every warning; the module cffi generates around it gets the same flags
CFLAGS = ["-O2", "-pthread", "-Wall", "-Wextra", "-Werror"]


def cdef():
    """The declarations cffi needs: the header's part between the cdef markers."""
    text = HEADER.read_text()
    begin, end = text.find(CDEF_BEGIN), text.find(CDEF_END)
    if begin < 0 or end < begin:
        raise SystemExit(f"{HEADER}: the cdef markers are missing")
    return text[begin + len(CDEF_BEGIN):end]


def build():
    """Compile in build/cffi and place the extension module next to this file."""
    ffi = FFI()
    ffi.cdef(cdef())
    ffi.set_source("_emuc", '#include "emuc.h"', sources=[str(SOURCE)], include_dirs=[str(HERE)],
                   extra_compile_args=CFLAGS, extra_link_args=["-pthread"])
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    built = pathlib.Path(ffi.compile(tmpdir=str(BUILD_DIR), verbose=False))
    target = HERE / built.name
    staging = target.with_name(target.name + ".new")
    shutil.copyfile(built, staging)
    os.replace(staging, target)  # a new inode: emulators running the old module keep their mapping
    return target


if __name__ == "__main__":
    print("built", build())
