"""Build our libunicorn: the pinned unicorn 2.1.4 source distribution from PyPI plus the
patch series in ``engine/unicorn/`` (``python engine/build.py``, run by ``make setup``).

The result is ``build/engine/lib/libunicorn.so.2``; ``emu`` points the PyPI binding at it
(``LIBUNICORN_PATH``) before ``unicorn`` is imported.  x86 only, about 20 s on 2 cores.
Without cmake, a C compiler or patch it says so in one line and leaves the stock wheel in
use; any other failure (a patch that does not apply, a compile error) fails the build.
The build is skipped when the source, the patches and this script are unchanged.
"""

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PATCHES = sorted((ROOT / "engine" / "unicorn").glob("*.patch"))
OUT = ROOT / "build" / "engine"
LIB = OUT / "lib" / "libunicorn.so.2"
STAMP = OUT / "lib" / "inputs.sha256"
CACHE = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "emu-colo" / "engine"
VERSION = "2.1.4"
SDIST = f"unicorn-{VERSION}.tar.gz"
SDIST_SHA256 = "00567a70e323f749b419cd86bee4f9115beab7ebba32194581c090cbb7c59cff"


class BuildError(Exception):
    pass


def say(message):
    print(f"engine: {message}", flush=True)


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def inputs_digest():
    digest = hashlib.sha256(SDIST_SHA256.encode())
    for path in [pathlib.Path(__file__), *PATCHES]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def fetch_sdist():
    """The source distribution from PyPI (pip download), cached and checked."""
    path = CACHE / SDIST
    if path.exists() and sha256(path) == SDIST_SHA256:
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    say(f"downloading the unicorn {VERSION} source distribution from PyPI")
    result = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                             f"unicorn=={VERSION}", "-d", str(CACHE)], capture_output=True, text=True)
    if result.returncode != 0 or not path.exists():
        raise BuildError(f"pip download unicorn=={VERSION} failed: {result.stderr.strip()[-300:]}")
    if sha256(path) != SDIST_SHA256:
        path.unlink()
        raise BuildError(f"{SDIST} from PyPI does not have the expected SHA-256 {SDIST_SHA256}")
    return path


def unpack_and_patch(sdist):
    source = OUT / "src"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(source, filter="data")
    tree = source / f"unicorn-{VERSION}"
    for patch in PATCHES:
        result = subprocess.run(["patch", "-p1", "--forward", "--quiet", "-i", str(patch)], cwd=tree,
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise BuildError(f"{patch.name} does not apply: {(result.stdout + result.stderr).strip()[-300:]}")
    return tree / "src"


def compile_library(src):
    build = OUT / "cmake"
    shutil.rmtree(build, ignore_errors=True)
    configure = ["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DUNICORN_ARCH=x86",
                 "-DUNICORN_BUILD_TESTS=off", "-DUNICORN_INSTALL=off", "-DUNICORN_LEGACY_STATIC_ARCHIVE=off",
                 "-DBUILD_SHARED_LIBS=on"]
    for cmd in (configure, ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)]):
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise BuildError(f"{' '.join(cmd[:2])} failed: {(result.stdout + result.stderr).strip()[-600:]}")
    LIB.parent.mkdir(parents=True, exist_ok=True)
    staging = LIB.with_name(LIB.name + ".new")
    shutil.copyfile(build / "libunicorn.so.2", staging)
    os.replace(staging, LIB)  # a new inode: running emulators keep the library they loaded


def main():
    missing = [tool for tool in ("cmake", "cc", "patch") if shutil.which(tool) is None]
    if missing:
        say(f"{', '.join(missing)} not found: using the stock unicorn wheel (slow engine, no exact dirty log)")
        return 0
    digest = inputs_digest()
    if LIB.exists() and STAMP.exists() and STAMP.read_text().strip() == digest:
        return 0
    try:
        sdist = fetch_sdist()
        say(f"building libunicorn {VERSION} (x86) with {len(PATCHES)} patches")
        compile_library(unpack_and_patch(sdist))
    except BuildError as e:
        say(str(e))
        return 1
    STAMP.write_text(digest + "\n")
    say(f"built {LIB.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
