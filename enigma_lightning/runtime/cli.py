"""Command-line conveniences shared by the entry points."""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import os
import sys


def config_options(group: str) -> set[str]:
    root = importlib.resources.files("enigma_lightning.conf") / group
    return {p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml")}


def rewrite_model_override(argv: list[str]) -> list[str]:
    """``model=<hub id or local folder>`` becomes ``model=hf model.name_or_path=<...>`` when the value is not one of
    the presets in ``conf/model/`` (``model=Qwen/Qwen2.5-0.5B-Instruct`` just works), and ``rollout.engine=<option>``
    selects the engine as ``rollout/engine=<option>`` does (options: ``conf/rollout/engine/``)."""
    presets = config_options("model")
    engines = config_options("rollout/engine")
    out = []
    for arg in argv:
        if arg.startswith("rollout.engine=") and all(v in engines for v in arg.split("=", 1)[1].split(",")):
            out.append("rollout/engine=" + arg.split("=", 1)[1])
            continue
        if arg.startswith("model=") and "," not in arg:
            value = arg.split("=", 1)[1]
            if value and value not in presets:
                out += ["model=hf", f"model.name_or_path={value}"]
                continue
        out.append(arg)
    return out


def _principles_option(value: str, notes: list[str]) -> str:
    """One ``principles=`` value as Hydra's option: a file is checked and staged (``files/<name>-<hash>``); a user
    set is checked as Hydra will read it; a package set's name stays (a user set of that name is shadowed: noted)."""
    from ..data.principles import (
        find_principle_set,
        is_principle_path,
        load_named_set,
        stage_principle_file,
        user_principles_dir,
    )

    bare = value.strip()
    if len(bare) > 1 and bare[0] == bare[-1] and bare[0] in "'\"":
        bare = bare[1:-1]
    if is_principle_path(bare):
        return stage_principle_file(bare)
    found = find_principle_set(bare)
    if found and found[0] == "user":
        load_named_set(*found)
    elif found and found[0] == "package":
        shadowed = user_principles_dir() / f"{bare}.yaml"
        if shadowed.is_file():
            notes.append(f"principles={bare} is the package's set; yours, {shadowed}, has the same name and is never "
                         "selected: rename it (and its `name:`)")
    return value


def rewrite_principles(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv with principle set files made Hydra options, a note for each shadowed user set).

    ``principles=/path/to/set.yaml`` (a path: it holds a ``/`` or ends in .yaml/.yml) is read safely, checked and
    staged, and passed on as ``principles=files/<name>-<hash>``; a comma list (``--multirun principles=high_si,
    /p/a.yaml``) element by element, as are ``choice(...)`` and the si command's ``sets=[high_si,/p/a.yaml,my_set]``.
    A problem in a file raises :class:`EnigmaError` naming the file and the fix. Other sweep functions pass
    unchanged."""
    out, notes = [], []

    def options(values: str) -> str:
        return ",".join(_principles_option(v, notes) for v in values.split(",")) if values.strip() else values

    for arg in argv:
        key, eq, value = arg.partition("=")
        name = key.lstrip("+")
        if not eq:
            out.append(arg)
        elif name == "principles" and value.startswith("choice(") and value.endswith(")"):
            out.append(f"{key}=choice({options(value[7:-1])})")
        elif name == "principles" and "(" not in value:
            out.append(f"{key}={options(value)}")
        elif name == "sets" and value.startswith("[") and value.endswith("]") and "[" not in value[1:-1]:
            out.append(f"{key}=[{options(value[1:-1])}]")
        else:
            out.append(arg)
    return out, notes


# keys that moved, and where they live now: named in the error instead of Hydra's "not in struct"
MOVED = {f"grpo.{k}": f"step.{k}" for k in ("num_generations", "num_iterations", "scale_rewards",
                                           "mask_truncated_completions")}


def moved_keys(argv: list[str]) -> list[str]:
    """A message for each override that sets a key which has moved (``grpo.num_generations=8``)."""
    out = []
    for arg in argv:
        key = arg.split("=", 1)[0].lstrip("+~")
        if "=" in arg and key in MOVED:
            out.append(f"{key} is now {MOVED[key]} (the group a step learns from, conf/step/): set "
                       f"{MOVED[key]}={arg.split('=', 1)[1]}")
    return out


def other_names(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv with other trainers' names mapped to ours, a note for each): ``max_completion_length=128`` (TRL's name,
    at the top level or under ``rollout.``) runs as ``rollout.max_new_tokens=128``."""
    from .targets import OTHER_NAMES

    out, notes = [], []
    for arg in argv:
        key, eq, value = arg.partition("=")
        bare = key.lstrip("+~")
        name = bare.split(".", 1)[1] if bare.startswith("rollout.") else bare
        if eq and name in OTHER_NAMES and not key.startswith("~"):
            ours, who = OTHER_NAMES[name]
            out.append(f"{ours}={value}")
            notes.append(f"{bare} is {who}'s name for {ours}: running with {ours}={value}")
        else:
            out.append(arg)
    return out, notes


def hydra_target_problems(argv: list[str]) -> list[str]:
    """Hydra builds ``hydra.*`` objects (callbacks, launchers, sweepers) before any of our code sees the config, so
    their ``_target_`` overrides are checked here, against the same allow-list (plus Hydra's own plugins)."""
    from .targets import allowed

    extra: list[str] = []
    for arg in argv:
        key, _, value = arg.lstrip("+~").partition("=")
        if key == "allowed_targets":
            extra += [v.strip() for v in value.strip("[]").split(",") if v.strip()]
    out = []
    for arg in argv:
        key, _, value = arg.lstrip("+~").partition("=")
        if key.startswith("hydra.") and key.endswith("._target_") and not (
                allowed(value, extra) or value.startswith(("hydra.", "hydra_plugins."))):
            out.append(f"{key}={value} is not an allowed target (the project's own, Hydra's plugins, ...). If you trust "
                       f"it, allow it explicitly: allowed_targets=[{value}]")
    return out


def offline_defaults() -> None:
    """No hub round-trips when the user has said there is no hub (HF_HUB_OFFLINE=1 in CI and tests)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@contextlib.contextmanager
def exit_on_user_error():
    """A user error (:class:`EnigmaError`) is printed plainly, without a traceback, and exits with status 2."""
    from ..errors import EnigmaError

    try:
        yield
    except EnigmaError as e:
        logging.getLogger("enigma_lightning").error("%s", e)
        print(f"\nerror: {e}", file=sys.stderr)
        sys.exit(2)


def entry_point(main) -> None:
    """Run a Hydra ``main``: offline defaults, ``model=<hub id or folder>`` and ``principles=<file>`` rewritten."""
    from ..errors import EnigmaError

    offline_defaults()
    if problems := moved_keys(sys.argv[1:]) + hydra_target_problems(sys.argv[1:]):
        print("\nerror: " + "\n       ".join(problems), file=sys.stderr)
        sys.exit(2)
    argv, notes = other_names(sys.argv[1:])
    try:
        argv, shadowed = rewrite_principles(argv)
    except EnigmaError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        sys.exit(2)
    for note in notes + shadowed:
        print(f"note: {note}", file=sys.stderr)
    sys.argv = [sys.argv[0], *rewrite_model_override(argv)]
    main()


def own_keys(config_name: str) -> set[str]:
    """The top-level keys a command's config defines: its own settings and the groups its defaults list selects
    (``conf/<config_name>.yaml``)."""
    from omegaconf import OmegaConf

    primary = OmegaConf.load(importlib.resources.files("enigma_lightning.conf") / f"{config_name}.yaml")
    keys = {str(k) for k in primary if k != "defaults"}
    for entry in primary.get("defaults", []):
        if isinstance(entry, str):
            continue  # _self_, shared/training_groups
        (group,) = entry.keys()
        keys.add(str(group).split("/")[-1].removeprefix("optional "))
    return keys - {"experiment"}


def drop_training_settings(cfg, config_name: str):
    """``cfg`` without what an experiment preset (``experiment=smoke``) sets for training alone (``trainer``,
    ``data``, ``logger``, ...): the keys ``conf/<config_name>.yaml`` does not define. Says which it dropped."""
    from omegaconf import OmegaConf

    extra = sorted(str(k) for k in cfg if str(k) not in own_keys(config_name))
    if not extra:
        return cfg
    source = f" (from experiment={cfg_choice('experiment')})" if cfg_choice("experiment") else ""
    print(f"{config_name}: the training settings {', '.join(extra)}{source} do not apply here; ignored")
    out = OmegaConf.masked_copy(cfg, [str(k) for k in cfg if str(k) not in extra])
    OmegaConf.set_struct(out, True)
    return out


def cfg_choice(group: str) -> str | None:
    """The option a group was given in this Hydra run (``experiment=smoke``), if any."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get(group)
    except ValueError:
        return None


def hydra_command(run, config_name: str):
    """(main, cli) for a command ``run(cfg)`` on ``conf/<config_name>.yaml``: user errors exit plainly (status 2);
    an experiment preset's training settings are dropped (:func:`drop_training_settings`)."""
    import hydra

    @hydra.main(version_base="1.3", config_path="pkg://enigma_lightning.conf", config_name=config_name)
    def main(cfg) -> None:
        with exit_on_user_error():
            run(drop_training_settings(cfg, config_name))

    def cli() -> None:
        entry_point(main)

    return main, cli
