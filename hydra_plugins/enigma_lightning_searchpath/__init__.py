"""Hydra search path plugin of enigma-lightning: the user's own config options, next to the package's.

Hydra discovers every plugin under the ``hydra_plugins`` namespace package. This one appends, for enigma-lightning's
commands only (the search path holds ``pkg://enigma_lightning.conf``):

- ``file://<user root>``: ``$ENIGMA_CONF``, else ``$XDG_CONFIG_HOME/enigma_lightning`` (by default
  ``~/.config/enigma_lightning``). A principle set in ``<user root>/principles/<name>.yaml`` is selected with ``principles=<name>``.
- ``file://<cache>/principle_files``: where ``principles=/path/to/set.yaml`` is staged by the command line as
  ``principles/files/<name>-<hash>.yaml`` (selected as ``principles=files/<name>-<hash>``).

Both are appended after the package's configs, so a package option always wins over a user option of the same name.
The roots are read from the environment each time a search path is built (not when this module is imported), and a
root that does not exist is simply not available to Hydra (no warning, no error).
"""

from __future__ import annotations

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

PACKAGE_CONF = "pkg://enigma_lightning.conf"


class EnigmaLightningSearchPathPlugin(SearchPathPlugin):
    """Appends the user's config root and the staged principle files to enigma-lightning's search path."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if not any(element.path == PACKAGE_CONF for element in search_path.get_path()):
            return  # another Hydra application in the same environment: leave its search path alone
        from enigma_lightning.data.locations import config_root, principle_files_root

        search_path.append(provider="enigma_lightning-user", path=f"file://{config_root().absolute()}")
        search_path.append(provider="enigma_lightning-files", path=f"file://{principle_files_root().absolute()}")
