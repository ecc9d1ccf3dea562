"""``python -m enigma_lightning.si``: see :mod:`enigma_lightning.commands.si`."""

from .commands.si import cli

if __name__ == "__main__":
    cli()
