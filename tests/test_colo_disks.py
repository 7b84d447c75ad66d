"""The disks when a COLO pair forms (colo/disksync.py): each VM has its own copy of the
image; the copies are compared per MiB and only the chunks that differ are copied, and a
pair whose drives do not match is refused with a message that says why.  Real processes,
the service firmware (which leaves the disk alone) on a virtio disk."""

import numpy as np
from colopair import ColoDeployment

MIB = 1 << 20


def images(tmp_path, size=4 * MIB, differ=(), secondary_size=None):
    primary, secondary = tmp_path / "p.img", tmp_path / "s.img"
    data = np.random.default_rng(11).integers(0, 256, size, dtype=np.uint8).tobytes()
    primary.write_bytes(data)
    copy = bytearray(data[:secondary_size] if secondary_size else data)
    for chunk in differ:
        copy[chunk * MIB + 1234] ^= 0xFF
    secondary.write_bytes(bytes(copy))
    return primary, secondary


def deploy(tmp_path, primary, secondary):
    return ColoDeployment(tmp_path, arbiter=False, primary_args=["-drive", f"file={primary},format=raw,if=virtio"],
                          secondary_args=["-drive", f"file={secondary},format=raw,if=virtio"])


def test_only_the_chunks_that_differ_are_copied(tmp_path):
    primary, secondary = images(tmp_path, differ=(1, 3))
    d = deploy(tmp_path, primary, secondary)
    try:
        d.wait_colo()
        d.primary.wait_for(r"disk drive0: copied 2 MiB \(of 4 MiB checked\)")
        assert secondary.read_bytes() == primary.read_bytes()
    except BaseException:
        print(d.logs())
        raise
    finally:
        d.close()


def test_identical_images_are_only_checked(tmp_path):
    primary, secondary = images(tmp_path)
    d = deploy(tmp_path, primary, secondary)
    try:
        d.wait_colo()
        d.primary.wait_for(r"disk drive0: images identical \(4 MiB checked\)")
        assert "copied" not in d.primary.stderr()
    finally:
        d.close()


def test_a_pair_whose_images_differ_in_size_is_refused(tmp_path):
    primary, secondary = images(tmp_path, secondary_size=2 * MIB)
    before = secondary.read_bytes()
    d = deploy(tmp_path, primary, secondary)
    try:
        reason = "disk drive0: 4194304 bytes on the source, 2097152 here"
        d.primary.wait_for(reason)
        d.secondary.wait_for(reason)
        assert secondary.read_bytes() == before
    except BaseException:
        print(d.logs())
        raise
    finally:
        d.close()
