"""Information-geometry measures (:mod:`.geometry`); the probe command is :mod:`enigma_lightning.probe`."""
