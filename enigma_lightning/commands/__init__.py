"""The commands (thin: compose a config, wire objects, run): ``python -m enigma_lightning.<command>`` for train,
evaluate, probe, si, report and dashboard (the top-level modules of the package forward to these)."""
