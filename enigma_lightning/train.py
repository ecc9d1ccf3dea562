"""``python -m enigma_lightning.train``: see :mod:`enigma_lightning.commands.train`."""

from .commands.train import main

if __name__ == "__main__":
    main()
