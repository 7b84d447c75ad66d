"""The machine core (see ARCHITECTURE in the README).

Importing it points the unicorn binding at our own engine build (``build/engine/lib``,
made by ``make setup`` from ``engine/``) unless ``LIBUNICORN_PATH`` already names one:
this must happen before anything imports ``unicorn``.
"""

import os
import pathlib

_ENGINE_LIB = pathlib.Path(__file__).resolve().parent.parent / "build" / "engine" / "lib"
if "LIBUNICORN_PATH" not in os.environ and (_ENGINE_LIB / "libunicorn.so.2").exists():
    os.environ["LIBUNICORN_PATH"] = str(_ENGINE_LIB)
