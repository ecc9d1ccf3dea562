"""``python -m enigma_lightning.principles``: see :mod:`enigma_lightning.commands.principles`."""

from .commands.principles import cli

if __name__ == "__main__":
    cli()
