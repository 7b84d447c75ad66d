"""``python -m emu``: the ``emu`` command.  The one module under ``emu/`` that reaches the
top floor (``frontend``): it is the program's entry point, which nothing imports."""

import sys

from frontend.cli import main

sys.exit(main())
