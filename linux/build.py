"""Fetch Debian's Linux kernel and build a busybox initramfs for the ``pc`` machine.

    python -m linux.build [--cache DIR] [--force]

Downloads ``linux-image-amd64``'s kernel package and ``busybox-static`` with
``apt-get download``, unpacks them with ``dpkg-deb -x`` and writes a gzip-compressed newc
cpio initramfs (busybox, its applet links and an ``/init`` script) in pure Python.  Everything
goes to a cache directory outside the repository (``$EMU_LINUX_CACHE`` or
``~/.cache/emu-colo/linux``); a second run only prints the paths.  The last two lines of the
output are ``kernel=PATH`` and ``initrd=PATH``.
"""

import argparse
import glob
import gzip
import hashlib
import io
import os
import shutil
import stat
import struct
import subprocess
import sys
from dataclasses import dataclass

KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
INIT_MARKER = "emu-colo initramfs: init started"
SHELL_MARKER = "emu-colo shell ready"

#: kernel modules in the initramfs, loaded by /init (their dependencies come along)
MODULES = ("virtio_pci", "virtio_net", "virtio_blk", "crc32c_generic", "ext4")

INIT_SCRIPT = f"""#!/bin/sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
/bin/busybox mount -t tmpfs tmpfs /tmp
echo "{INIT_MARKER}"
export PATH=/bin:/sbin HOME=/root PS1='# '
for m in $(cat /lib/modules/load-order); do insmod /lib/modules/$m.ko 2>/dev/null; done
ip link set lo up
# emu.ip=ADDRESS/PREFIX[,GATEWAY] on the kernel command line configures eth0
for word in $(cat /proc/cmdline); do
    case "$word" in
    emu.ip=*)
        spec=${{word#emu.ip=}}
        ip link set eth0 up && ip addr add ${{spec%%,*}} dev eth0
        case "$spec" in *,*) ip route add default via ${{spec#*,}} ;; esac
        ;;
    esac
done
cd /root
while true; do
    echo "{SHELL_MARKER}"
    /bin/busybox setsid /bin/busybox cttyhack /bin/sh
    echo "shell exited (status $?); restarting"
done
"""

#: busybox applet links placed in /bin (busybox --list may fail on hosts that cannot run it).
APPLETS = (
    "sh", "ash", "cat", "echo", "ls", "mount", "umount", "uname", "date", "dmesg", "ps", "mkdir",
    "rm", "cp", "mv", "sleep", "setsid", "cttyhack", "poweroff", "reboot", "halt", "sync", "head",
    "tail", "grep", "wc", "free", "uptime", "env", "true", "false", "test", "[", "hexdump", "od",
    "stat", "touch", "ln", "chmod", "df", "md5sum", "sha256sum", "seq", "yes", "dd", "tr", "sed",
    "awk", "vi", "find", "xargs", "sort", "uniq", "cut", "kill", "top", "hwclock", "devmem",
    "insmod", "lsmod", "ip", "ifconfig", "route", "ping", "udhcpc", "httpd", "wget", "nc", "netstat",
    "mdev", "blockdev", "fsync", "mknod", "lspci", "cmp", "printf", "expr", "basename",
)


def default_cache():
    return os.environ.get("EMU_LINUX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "emu-colo", "linux")


class BuildError(Exception):
    pass


def _run(cmd, cwd=None):
    try:
        result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise BuildError(f"{cmd[0]}: not found (a Debian host with apt-get and dpkg-deb is needed)") from None
    if result.returncode:
        raise BuildError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()[-800:]}")
    return result.stdout


def _refresh_package_lists():
    """A fresh machine may have no package lists yet: fetch them once, if we may."""
    if hasattr(os, "geteuid") and os.geteuid() == 0 and not getattr(_refresh_package_lists, "done", False):
        _refresh_package_lists.done = True
        _run(["apt-get", "update", "-qq"])
        return True
    return False


def kernel_package_name():
    """The concrete kernel package the meta package depends on (linux-image-6.1.0-N-amd64)."""
    try:
        out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
    except BuildError:
        if not _refresh_package_lists():
            raise
        out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:"):
            name = line.split(":", 1)[1].strip()
            if name.startswith("linux-image-") and name.endswith("-amd64"):
                return name
    if _refresh_package_lists():
        return kernel_package_name()
    raise BuildError(f"apt-cache depends {KERNEL_META_PACKAGE}: no linux-image-*-amd64 dependency "
                     f"(run apt-get update?)")


def fetch_package(name, cache):
    """``apt-get download`` NAME into CACHE/debs and unpack it under CACHE/pkg/NAME."""
    debs = os.path.join(cache, "debs")
    root = os.path.join(cache, "pkg", name)
    done = os.path.join(root, ".unpacked")
    if os.path.exists(done):
        return root
    os.makedirs(debs, exist_ok=True)
    found = glob.glob(os.path.join(debs, f"{name}_*.deb"))
    if not found:
        try:
            _run(["apt-get", "download", name], cwd=debs)
        except BuildError:
            if not _refresh_package_lists():
                raise
            _run(["apt-get", "download", name], cwd=debs)
        found = glob.glob(os.path.join(debs, f"{name}_*.deb"))
        if not found:
            raise BuildError(f"apt-get download {name}: no .deb appeared in {debs}")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    _run(["dpkg-deb", "-x", sorted(found)[-1], root])
    open(done, "w").close()
    return root


# ---------------------------------------------------------------------------- newc cpio

@dataclass
class CpioEntry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple = (0, 0)


def _newc_header(ino, entry, nlink):
    name = entry.name.encode() + b"\0"
    fields = (ino, entry.mode, 0, 0, nlink, 0, len(entry.data), 0, 0,
              entry.rdev[0], entry.rdev[1], len(name), 0)
    return b"070701" + b"".join(b"%08X" % v for v in fields) + name


def _pad4(buf):
    buf.write(b"\0" * (-buf.tell() % 4))


def write_newc(entries):
    """A newc ("070701") cpio archive of the entries, ending with TRAILER!!!."""
    buf = io.BytesIO()
    for ino, entry in enumerate(entries, start=1):
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        buf.write(_newc_header(ino, entry, nlink))
        _pad4(buf)
        buf.write(entry.data)
        _pad4(buf)
    buf.write(_newc_header(0, CpioEntry("TRAILER!!!", 0), 1))
    _pad4(buf)
    return buf.getvalue()


def initramfs_entries(busybox, modules=()):
    """The archive's entries; ``modules``: (name, .ko bytes) in the order /init loads them."""
    entries = [CpioEntry(d, stat.S_IFDIR | 0o755)
               for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "root", "etc", "mnt", "srv", "lib",
                         "lib/modules")]
    entries.append(CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    entries.append(CpioEntry("dev/ttyS0", stat.S_IFCHR | 0o660, rdev=(4, 64)))
    entries.append(CpioEntry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)))
    entries.append(CpioEntry("bin/busybox", stat.S_IFREG | 0o755, busybox))
    for applet in APPLETS:
        entries.append(CpioEntry(f"bin/{applet}", stat.S_IFLNK | 0o777, b"busybox"))
    entries.append(CpioEntry("init", stat.S_IFREG | 0o755, INIT_SCRIPT.encode()))
    for name, data in modules:
        entries.append(CpioEntry(f"lib/modules/{name}.ko", stat.S_IFREG | 0o644, data))
    order = "".join(f"{name}\n" for name, _ in modules)
    entries.append(CpioEntry("lib/modules/load-order", stat.S_IFREG | 0o644, order.encode()))
    return entries


# ---------------------------------------------------------------------------- kernel modules

def _modinfo(ko):
    """The key=value strings of an ELF64 module's .modinfo section."""
    if ko[:4] != b"\x7fELF" or ko[4] != 2:
        raise BuildError("a kernel module is not ELF64")
    shoff, = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", ko, shoff + i * shentsize) for i in range(shnum)]
    names = sections[shstrndx]
    for name, _, _, _, offset, size, *_ in sections:
        start = names[4] + name
        if ko[start:ko.index(b"\0", start)] == b".modinfo":
            return [item.decode("utf-8", "replace") for item in ko[offset:offset + size].split(b"\0") if item]
    return []


def module_closure(modules_dir, wanted):
    """(name, bytes) of ``wanted`` and every module they depend on, dependencies first."""
    paths = {}
    for path in glob.glob(os.path.join(modules_dir, "**", "*.ko"), recursive=True):
        paths[os.path.basename(path)[:-3].replace("-", "_")] = path
    ordered, seen = [], set()

    def visit(name):
        key = name.replace("-", "_")
        if key in seen:
            return
        seen.add(key)
        if key not in paths:
            raise BuildError(f"kernel module {name!r} is not in the kernel package")
        with open(paths[key], "rb") as f:
            data = f.read()
        for item in _modinfo(data):
            if item.startswith("depends="):
                for dependency in filter(None, item[len("depends="):].split(",")):
                    visit(dependency)
        ordered.append((os.path.basename(paths[key])[:-3], data))

    for name in wanted:
        visit(name)
    return ordered


def build_initramfs(busybox_path, out, modules=()):
    with open(busybox_path, "rb") as f:
        busybox = f.read()
    archive = write_newc(initramfs_entries(busybox, modules))
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(gzip.compress(archive, compresslevel=9, mtime=0))
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------- driver

def build(cache=None, force=False, log=print):
    """Fetch and build (cached); returns (kernel path, initrd path)."""
    cache = cache or default_cache()
    if force:
        shutil.rmtree(os.path.join(cache, "pkg"), ignore_errors=True)
    os.makedirs(cache, exist_ok=True)
    kernel_out = os.path.join(cache, "bzImage")
    # one initramfs per recipe (this file): checkouts of different versions share the cache
    recipe = _recipe_digest()
    initrd_out = os.path.join(cache, f"initramfs-{recipe[:12]}.cpio.gz")
    if not force and os.path.exists(kernel_out) and os.path.exists(initrd_out):
        _link_latest(cache, initrd_out)
        return kernel_out, initrd_out

    kpkg = kernel_package_name()
    log(f"fetching {kpkg}")
    kroot = fetch_package(kpkg, cache)
    kernels = sorted(glob.glob(os.path.join(kroot, "boot", "vmlinuz-*")))
    if not kernels:
        raise BuildError(f"{kpkg}: no boot/vmlinuz-* in the package")
    log(f"fetching {BUSYBOX_PACKAGE}")
    broot = fetch_package(BUSYBOX_PACKAGE, cache)
    busybox = os.path.join(broot, "bin", "busybox")
    if not os.path.exists(busybox):
        raise BuildError(f"{BUSYBOX_PACKAGE}: no bin/busybox in the package")

    modules_dir = glob.glob(os.path.join(kroot, "lib", "modules", "*"))
    if not modules_dir:
        raise BuildError(f"{kpkg}: no lib/modules in the package")
    build_initramfs(busybox, initrd_out, module_closure(modules_dir[0], MODULES))
    tmp = kernel_out + ".tmp"
    shutil.copyfile(kernels[-1], tmp)
    os.replace(tmp, kernel_out)
    with open(os.path.join(cache, "VERSION"), "w") as f:
        f.write(f"{kpkg} {os.path.basename(kernels[-1])}\n")
    _link_latest(cache, initrd_out)
    return kernel_out, initrd_out


def _link_latest(cache, initrd_out):
    """initramfs.cpio.gz names the initramfs this version builds (what the README shows)."""
    link = os.path.join(cache, "initramfs.cpio.gz")
    tmp = link + ".tmp"
    try:
        os.remove(tmp)
    except FileNotFoundError:
        pass
    os.symlink(os.path.basename(initrd_out), tmp)
    os.replace(tmp, link)


def _recipe_digest():
    """What the cached initramfs was built from: this file (its /init, applets and cpio writer)."""
    with open(__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m linux.build", description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=None, help="cache directory (default ~/.cache/emu-colo/linux)")
    parser.add_argument("--force", action="store_true", help="unpack and rebuild even if cached")
    args = parser.parse_args(argv)
    try:
        kernel, initrd = build(args.cache, args.force, log=lambda m: print(m, file=sys.stderr))
    except BuildError as e:
        print(f"linux/build.py: {e}", file=sys.stderr)
        return 1
    print(f"kernel={kernel}")
    print(f"initrd={initrd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
