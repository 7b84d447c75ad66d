"""The top floor: what users talk to.  ``cli`` is the ``emu`` command (``emu run``),
``colo`` its ``emu colo ...`` commands, ``qmp`` the QMP monitor.  It wires the machine core
(``emu``), the boards (``machines``) and replication (``colo``) together; none of them
imports it."""
