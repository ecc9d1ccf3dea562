"""OmegaConf resolvers the configs use (registered when the package is imported)."""

from __future__ import annotations

from omegaconf import OmegaConf


def devices(value) -> int:
    """A trainer's ``devices`` as a count (for launcher sizing); ``auto`` is refused with the fix."""
    if isinstance(value, int):
        return value
    if isinstance(value, list | tuple) or hasattr(value, "__len__") and not isinstance(value, str):
        return len(value)
    if str(value).isdigit():
        return int(value)
    raise ValueError(f"trainer.devices={value!r}: the launcher needs a number of devices per node. "
                     "Set trainer.devices=<GPUs per node>")


def gpus(accelerator, value) -> int:
    """GPUs per node to request: 0 for CPU trainers, else the device count."""
    return 0 if str(accelerator) == "cpu" else devices(value)


def terms(*, _root_) -> dict:
    """``${enigma_terms:}``: the selected loss terms' settings, ``{name: <name>'s node}`` for every ``loss.<name>: true``
    (a term's YAML selects it under ``loss`` and keeps its settings under its own name, so ``ot.epsilon=...``)."""
    loss = _root_.get("loss") or {}
    return OmegaConf.create({str(k): OmegaConf.to_container(_root_[k], resolve=True)
                             for k, v in loss.items() if v and k in _root_})


def register() -> None:
    for name, fn in (("enigma_devices", devices), ("enigma_gpus", gpus), ("enigma_terms", terms)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
