"""The device models, one module per chip (named after the chip), each declaring its
guest-visible state with :mod:`emu.state.vmstate`; ``machines/`` wires them together."""
