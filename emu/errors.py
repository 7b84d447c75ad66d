"""One exception hierarchy for the whole emulator.

Messages name the component and the value, e.g.
``serial@0x3f8: LCR write 0x1ff out of range``.
"""


#: exit status when the emulator cannot go on (sysexits' EX_SOFTWARE): even, so never the
#: status of a guest's isa-debug-exit ((v << 1) | 1), and not 2 (bad configuration)
RUNTIME_FAILURE_STATUS = 70


class EmuError(Exception):
    """Base of every error the emulator raises on purpose."""


class ConfigError(EmuError):
    """A bad option, a missing or malformed image: reported in one line, exit status 2."""


class GuestError(EmuError):
    """The guest did something the machine cannot honour (unsupported feature, triple fault under -no-reboot)."""


class UnsupportedError(GuestError):
    """The guest touched something we do not model (task gate, virtual-8086 mode, ...)."""


class StateError(EmuError):
    """A snapshot or checkpoint stream is malformed or inconsistent; nothing was applied."""
