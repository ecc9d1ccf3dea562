"""``python -m enigma_lightning.claim``: see :mod:`enigma_lightning.commands.claim`."""

from .commands.claim import main

if __name__ == "__main__":
    main()
