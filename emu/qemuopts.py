"""QEMU's option-list syntax, shared by the options that use it (``-fw_cfg``, ``-initrd``)."""


def split_commas(text):
    """Comma-separated parts, where ``,,`` stands for a literal comma (QemuOpts)."""
    parts, current, i = [], [], 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    parts.append("".join(current))
    return parts
