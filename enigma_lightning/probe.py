"""``python -m enigma_lightning.probe``: see :mod:`enigma_lightning.commands.probe`."""

from .commands.probe import cli

if __name__ == "__main__":
    cli()
