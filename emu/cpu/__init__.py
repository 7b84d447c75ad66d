"""The CPU: our libunicorn engine (``engine``), the x86 CPU around it (``x86``: interrupt
and exception delivery, CPUID, slices), its saved context (``context``), its state by
register name (``state``) and the C helper that runs inside the engine (``emuc.c`` and
``emuc.h``, built into ``_emuc`` by ``cbuild``)."""
