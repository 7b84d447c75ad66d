"""The 8042 keyboard controller with a PS/2 keyboard and mouse behind it (ports 0x60, 0x64).

Follows QEMU's ``hw/input/pckbd.c`` and ``hw/input/ps2.c`` (7.2): the status register
(OBF, self-test flag, command/data flag, unlocked, AUX OBF), the command byte (``mode``:
IRQ1 / IRQ12 enables, translation), the controller commands (0x20/0x60 command byte,
0xa7-0xab interface enable and tests, 0xaa self-test answering 0x55, 0xad/0xae, 0xc0
input port, 0xd0/0xd1 output port, 0xd2/0xd3 write the output buffer, 0xd4 write to the
mouse, 0xdd/0xdf A20, 0xf0-0xff pulse output port bits) and the output port, whose bit 0
is the CPU reset line (0x64 <- 0xfe pulses it: Linux ``reboot=kbd``, its default after
ACPI) and bit 1 drives the A20 gate.  The keyboard (MF2, ID 0xab 0x83, or 0x41 when the
controller translates) and the mouse (a plain PS/2 mouse, ID 0x00) answer their
commands so that Linux's i8042, atkbd and psmouse drivers and SeaBIOS find them; no host
keys or mouse movement are fed in (the console is the serial port).
"""

from emu.device import Device
from emu.errors import StateError
from emu.state.vmstate import U8, VarBytes, VMStateDescription

STAT_OBF, STAT_SELFTEST, STAT_CMD, STAT_UNLOCKED, STAT_MOUSE_OBF = 0x01, 0x04, 0x08, 0x10, 0x20
MODE_KBD_INT, MODE_MOUSE_INT, MODE_DISABLE_KBD, MODE_DISABLE_MOUSE, MODE_KCC = 0x01, 0x02, 0x10, 0x20, 0x40
OUT_RESET, OUT_A20, OUT_OBF, OUT_MOUSE_OBF, OUT_ONES = 0x01, 0x02, 0x10, 0x20, 0xCC
QUEUE_LIMIT = 15  # ps2_queue: PS2_QUEUE_SIZE - 1 bytes fit
ACK, RESEND, POR = 0xFA, 0xFE, 0xAA
NO_COMMAND = 0


def _check_queue(device):
    if len(device.queue) > QUEUE_LIMIT:
        raise StateError(f"{device.name}: field queue: {len(device.queue)} bytes, at most {QUEUE_LIMIT}")


class Ps2Keyboard:
    """A PS/2 keyboard as ps2.c's PS2KbdState: a reply queue and the command in progress."""

    def __init__(self, name, changed):
        self.name = name
        self.changed = changed  # callable(): the queue's emptiness may have changed
        self.translate = 0
        self.power_on()

    def power_on(self):
        self.queue = bytearray()
        self.last = 0
        self.write_cmd = NO_COMMAND
        self.scan_enabled = 1
        self.scancode_set = 2
        self.ledstate = 0

    def put(self, *values):
        for value in values:
            if len(self.queue) < QUEUE_LIMIT:
                self.queue.append(value)
        self.changed()

    def read(self):
        if self.queue:
            self.last = self.queue.pop(0)
            self.changed()
        return self.last  # an empty queue repeats the last byte (ps2_read_data, for EMM386)

    def _reset_keyboard(self):
        self.scan_enabled, self.scancode_set, self.ledstate = 1, 2, 0

    def write(self, value):
        command, self.write_cmd = self.write_cmd, NO_COMMAND
        if command == 0xF0:  # scancode set: 0 asks which
            if value == 0:
                self.put(ACK, {1: 0x43, 2: 0x41, 3: 0x3F}[self.scancode_set])
                return
            if 1 <= value <= 3:
                self.scancode_set = value
            self.put(ACK)
        elif command == 0xED:
            self.ledstate = value
            self.put(ACK)
        elif command == 0xF3:
            self.put(ACK)
        elif value == 0x05:
            self.put(RESEND)
        elif value == 0xF2:
            self.put(ACK, 0xAB, 0x41 if self.translate else 0x83)
        elif value == 0xEE:
            self.put(0xEE)
        elif value == 0xF4:
            self.scan_enabled = 1
            self.put(ACK)
        elif value in (0xF0, 0xED, 0xF3):
            self.write_cmd = value
            self.put(ACK)
        elif value in (0xF5, 0xF6):
            self._reset_keyboard()
            self.scan_enabled = 0 if value == 0xF5 else 1
            self.put(ACK)
        elif value == 0xFF:
            self._reset_keyboard()
            self.put(ACK, POR)
        else:
            self.put(ACK)

    def _post_load(self):
        _check_queue(self)
        if self.scancode_set not in (1, 2, 3):
            raise StateError(f"{self.name}: field scancode_set: {self.scancode_set} is not 1, 2 or 3")
        if self.write_cmd not in (NO_COMMAND, 0xF0, 0xED, 0xF3):
            raise StateError(f"{self.name}: field write_cmd: {self.write_cmd:#04x} takes no argument")

    VMSTATE = VMStateDescription(
        "ps2kbd", version_id=1, minimum_version_id=1,
        fields=[VarBytes("queue", QUEUE_LIMIT), U8("last"), U8("write_cmd"), U8("scan_enabled"),
                U8("translate"), U8("scancode_set"), U8("ledstate")],
        post_load=lambda dev, version_id: dev._post_load())


MOUSE_REMOTE, MOUSE_ENABLED, MOUSE_SCALE21 = 0x40, 0x20, 0x10


class Ps2Mouse(Ps2Keyboard):
    """A PS/2 mouse as ps2.c's PS2MouseState (standard type 0; it never moves)."""

    def power_on(self):
        self.queue = bytearray()
        self.last = 0
        self.write_cmd = NO_COMMAND
        self.status = 0
        self.resolution = 2
        self.sample_rate = 100
        self.wrap = 0

    def _packet(self):
        self.put(0x08, 0, 0)  # no buttons, no movement

    def write(self, value):
        """A byte from the controller (ps2_write_mouse): the argument of a pending command, in
        wrap mode an echo (but for the two commands that still work there), else a command."""
        command, self.write_cmd = self.write_cmd, NO_COMMAND
        if command == 0xE8:
            self.resolution = value
            self.put(ACK)
        elif command == 0xF3:
            self.sample_rate = value
            self.put(ACK)
        elif self.wrap and value == 0xEC:
            self.wrap = 0
            self.put(ACK)
        elif self.wrap and value != 0xFF:
            self.put(value)
        else:
            self._command(value)

    def _command(self, value):
        if value in (0xE6, 0xE7):
            self.status = (self.status & ~MOUSE_SCALE21) | (MOUSE_SCALE21 if value == 0xE7 else 0)
        elif value == 0xEA:
            self.status &= ~MOUSE_REMOTE
        elif value == 0xEE:
            self.wrap = 1
        elif value == 0xF0:
            self.status |= MOUSE_REMOTE
        elif value == 0xF2:
            self.put(ACK, 0)
            return
        elif value in (0xE8, 0xF3):
            self.write_cmd = value
        elif value == 0xE9:
            self.put(ACK, self.status, self.resolution, self.sample_rate)
            return
        elif value == 0xEB:
            self.put(ACK)
            self._packet()
            return
        elif value == 0xF4:
            self.status |= MOUSE_ENABLED
        elif value == 0xF5:
            self.status &= ~MOUSE_ENABLED
        elif value == 0xF6:
            self.sample_rate, self.resolution, self.status = 100, 2, 0
        elif value == 0xFF:
            self.sample_rate, self.resolution, self.status, self.wrap = 100, 2, 0, 0
            self.put(ACK, POR, 0)
            return
        else:
            return  # ps2_write_mouse ignores other bytes
        self.put(ACK)

    def _post_load(self):
        _check_queue(self)
        if self.write_cmd not in (NO_COMMAND, 0xE8, 0xF3):
            raise StateError(f"{self.name}: field write_cmd: {self.write_cmd:#04x} takes no argument")

    VMSTATE = VMStateDescription(
        "ps2mouse", version_id=1, minimum_version_id=1,
        fields=[VarBytes("queue", QUEUE_LIMIT), U8("last"), U8("write_cmd"), U8("status"), U8("resolution"),
                U8("sample_rate"), U8("wrap")],
        post_load=lambda dev, version_id: dev._post_load())


class I8042(Device):
    """The controller on ports 0x60 (data, offset 0) and 0x64 (status/command, offset 4).

    ``kbd_irq`` / ``mouse_irq`` are IRQ1 and IRQ12, ``a20`` the A20 gate (``set_level``),
    ``on_reset()`` requests a system reset."""

    def __init__(self, name, kbd_irq, mouse_irq, a20, on_reset):
        super().__init__(name)
        self.kbd_irq, self.mouse_irq = kbd_irq, mouse_irq
        self.a20 = a20
        self.on_reset = on_reset
        self.kbd = Ps2Keyboard(f"{name}/kbd", self._update_irq)
        self.mouse = Ps2Mouse(f"{name}/aux", self._update_irq)
        self.reset()

    def state_objects(self):
        return [self, self.kbd, self.mouse]

    def command_port(self):
        """The device to register at port 0x64 (the bus hands each range offsets from 0)."""
        return _CommandPort(self)

    def sync_irq(self):
        """After a state load: status OBF bits and IRQ1 / IRQ12 from the queues."""
        self._update_irq()

    def reset(self):
        self.kbd.power_on()
        self.mouse.power_on()
        self.write_cmd = NO_COMMAND
        self.mode = MODE_KBD_INT | MODE_MOUSE_INT
        self.status = STAT_CMD | STAT_UNLOCKED
        self.outport = OUT_RESET | OUT_A20 | OUT_ONES
        self.kbd.translate = 0
        self._update_irq()

    # ------------------------------------------------------------------ ports
    def io_read(self, offset, size):
        if offset == 4:
            return self.status
        if offset != 0:
            return 0xFF
        device = self.mouse if self._pending() == "aux" else self.kbd
        return device.read()

    def io_write(self, offset, size, value):
        value &= 0xFF
        if offset == 4:
            self._command(value)
        elif offset == 0:
            self._data(value)

    def _pending(self):
        """Which device the output buffer holds a byte of: keyboard data first (kbd_update_irq)."""
        if self.kbd.queue:
            return "kbd"
        return "aux" if self.mouse.queue else None

    def _update_irq(self):
        pending = self._pending()
        self.status &= ~(STAT_OBF | STAT_MOUSE_OBF)
        self.outport &= ~(OUT_OBF | OUT_MOUSE_OBF)
        kbd_level = mouse_level = 0
        if pending is not None:
            self.status |= STAT_OBF
            self.outport |= OUT_OBF
            if pending == "aux":
                self.status |= STAT_MOUSE_OBF
                self.outport |= OUT_MOUSE_OBF
                mouse_level = 1 if self.mode & MODE_MOUSE_INT else 0
            elif self.mode & MODE_KBD_INT and not self.mode & MODE_DISABLE_KBD:
                kbd_level = 1
        self.kbd_irq.set_level(kbd_level)
        self.mouse_irq.set_level(mouse_level)

    def _write_outport(self, value):
        self.outport = value
        self.a20.set_level(value & OUT_A20)
        if not value & OUT_RESET:
            self.on_reset()

    def _command(self, value):
        if value & 0xF0 == 0xF0:  # pulse output port bits 3-0: only bit 0 (reset) matters
            value = 0xFE if not value & 1 else 0xFF
        if value == 0x20:
            self.kbd.put(self.mode)
        elif value in (0x60, 0xD1, 0xD2, 0xD3, 0xD4):
            self.write_cmd = value
        elif value == 0xA7:
            self.mode |= MODE_DISABLE_MOUSE
        elif value == 0xA8:
            self.mode &= ~MODE_DISABLE_MOUSE
        elif value in (0xA9, 0xAB):  # interface tests: no error
            self.kbd.put(0x00)
        elif value == 0xAA:
            self.status |= STAT_SELFTEST
            self.kbd.put(0x55)
        elif value == 0xAD:
            self.mode |= MODE_DISABLE_KBD
            self._update_irq()
        elif value == 0xAE:
            self.mode &= ~MODE_DISABLE_KBD
            self._update_irq()
        elif value == 0xC0:
            self.kbd.put(0x80)  # input port: keyboard not inhibited
        elif value == 0xD0:
            self.kbd.put(self.outport)
        elif value in (0xDD, 0xDF):
            self.outport = (self.outport | OUT_A20) if value == 0xDF else (self.outport & ~OUT_A20)
            self.a20.set_level(value == 0xDF)
        elif value == 0xFE:
            self.on_reset()
        # 0xff and unknown commands: ignored (QEMU logs them as guest errors)

    def _data(self, value):
        command, self.write_cmd = self.write_cmd, NO_COMMAND
        if command == NO_COMMAND:
            self.kbd.write(value)
        elif command == 0x60:
            self.mode = value
            self.kbd.translate = 1 if value & MODE_KCC else 0
            self._update_irq()
        elif command == 0xD1:
            self._write_outport(value)
        elif command == 0xD2:
            self.kbd.put(value)
        elif command == 0xD3:
            self.mouse.put(value)
        elif command == 0xD4:
            self.mouse.write(value)

    def _post_load(self):
        if self.write_cmd not in (NO_COMMAND, 0x60, 0xD1, 0xD2, 0xD3, 0xD4):
            raise StateError(f"{self.name}: field write_cmd: {self.write_cmd:#04x} is not a command "
                             "that takes a data byte")
        # status and outport OBF bits follow the queues (loaded before or after: re-derive at the end)

    VMSTATE = VMStateDescription(
        "pckbd", version_id=1, minimum_version_id=1,
        fields=[U8("write_cmd"), U8("status"), U8("mode"), U8("outport")],
        post_load=lambda dev, version_id: dev._post_load())


class _CommandPort(Device):
    """Port 0x64 of an :class:`I8042`: status on read, controller command on write."""

    def __init__(self, controller):
        super().__init__(controller.name.replace("@0x60", "@0x64"))
        self.controller = controller

    def io_read(self, offset, size):
        return self.controller.io_read(4, size)

    def io_write(self, offset, size, value):
        self.controller.io_write(4, size, value)
