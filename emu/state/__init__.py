"""The state framework: declarative device state (``vmstate``), the checked stream format
(``stream``) and saving and loading a whole machine (``machinestate``)."""
