"""Interrupt request lines between devices and interrupt controllers."""


class IrqLine:
    """One wire from a device to an interrupt controller input.

    The device drives a level (0/1); the controller decides whether it is edge or level
    triggered.  ``sink(number, level)`` is the controller's input method.
    """

    __slots__ = ("sink", "number", "level")

    def __init__(self, sink, number):
        self.sink = sink
        self.number = number
        self.level = 0

    def set_level(self, level):
        level = 1 if level else 0
        self.level = level
        self.sink(self.number, level)

    def raise_irq(self):
        self.set_level(1)

    def lower_irq(self):
        self.set_level(0)

    def pulse(self):
        self.set_level(1)
        self.set_level(0)


class NullIrq(IrqLine):
    """A line connected to nothing (for tests and optional wiring)."""

    def __init__(self):
        super().__init__(lambda n, level: None, -1)


class IrqRecorder:
    """A test sink that remembers the level of every input and the edges it saw."""

    def __init__(self):
        self.levels = {}
        self.edges = []

    def __call__(self, number, level):
        if self.levels.get(number, 0) != level:
            self.edges.append((number, level))
        self.levels[number] = level

    def line(self, number=0):
        return IrqLine(self, number)
