"""``python -m enigma_lightning.report``: see :mod:`enigma_lightning.commands.report`."""

from .commands.report import main

if __name__ == "__main__":
    main()
