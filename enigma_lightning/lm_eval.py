"""``python -m enigma_lightning.lm_eval``: see :mod:`enigma_lightning.commands.lm_eval`."""

from .commands.lm_eval import cli

if __name__ == "__main__":
    cli()
