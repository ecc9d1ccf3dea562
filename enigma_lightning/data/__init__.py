"""Data: datasets and the data module (:mod:`.datasets`), the bundled offline data (:mod:`.bundled`), prompts
(:mod:`.prompts`), principle sets (:mod:`.principles`) and evaluation sets (:mod:`.evalsets`)."""
