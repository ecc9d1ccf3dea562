"""``python -m enigma_lightning.evaluate``: see :mod:`enigma_lightning.commands.evaluate`."""

from .commands.evaluate import cli

if __name__ == "__main__":
    cli()
