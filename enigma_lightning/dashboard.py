"""``python -m enigma_lightning.dashboard``: see :mod:`enigma_lightning.commands.dashboard`."""

from .commands.dashboard import main

if __name__ == "__main__":
    main()
