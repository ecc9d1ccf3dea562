"""Principle sets: an organisation's principles as text, with their antithesis.

A set lives in one of three places, each selected with ``principles=`` in every command (train, si, evaluate,
probe; sweeps too: ``principles=high_si,my_set,/path/to/set.yaml``):

- the package, ``conf/principles/<name>.yaml``: ``principles=high_si``;
- the user's config root (:func:`user_principles_dir`: ``$ENIGMA_CONF/principles``, else
  ``~/.config/enigma_lightning/principles``), where :func:`save_principle_set` writes: ``principles=my_set``. Hydra
  finds it through the search path plugin ``hydra_plugins/enigma_lightning_searchpath``, after the package's sets: a
  user set never shadows a package set (saving one with a package set's name is refused);
- any file: ``principles=/path/to/set.yaml``. The command line reads it safely (:func:`load_principle_file`: YAML
  data only, nothing is built but a :class:`PrincipleSet`), checks it, and stages a copy under the cache
  (``<cache>/principle_files/principles/files/<name>-<hash>.yaml``, :func:`stage_principle_file`), which Hydra
  selects as ``principles=files/<name>-<hash>``: a file can never collide with a package or user name.

:func:`principle_set` resolves a name or a path the same way outside Hydra (``sets=[high_si,/p/a.yaml]`` in ``si``).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.resources
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import EnigmaError
from .locations import config_root, principle_files_root

TARGET = "enigma_lightning.data.principles.PrincipleSet"
FILES_PREFIX = "files/"  # staged files' options: principles=files/<name>-<hash>
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
YAML_SUFFIXES = (".yaml", ".yml")


@dataclass
class PrincipleSet:
    """A named set of principles and the contrasting variants SAMI and SI use.

    ``text`` is what training prompts carry. ``antithesis`` states the opposite policy; ``variants`` adds further
    contrasting texts. The K variants of a set are ``[text, antithesis, *variants]`` truncated to K.

    ``si`` (the set's measured Sufficiency Index and its controls) and ``provenance`` (where the set came from) are
    metadata that created sets carry; training ignores them. Config containers given by Hydra's ``instantiate``
    (without ``_convert_``) become plain lists and dicts.
    """

    name: str
    text: str
    antithesis: str = ""
    variants: list[str] = field(default_factory=list)
    description: str = ""
    si: dict | None = None
    provenance: dict | None = None

    def __post_init__(self) -> None:
        self.variants = list(_plain(self.variants) or [])
        self.si, self.provenance = _plain(self.si), _plain(self.provenance)

    def all_variants(self) -> list[str]:
        return [v for v in [self.text, self.antithesis, *self.variants] if v and v.strip()]


FIELDS = tuple(f.name for f in dataclasses.fields(PrincipleSet))
# what a principle set file may hold, in the order a saved file writes them (as the package's sets do)
KEYS = ("_target_", "name", "description", "text", "antithesis", "variants", "si", "provenance")


def _plain(value: Any) -> Any:
    """``value`` as plain YAML-safe data: OmegaConf containers, tuples, numpy/torch scalars and paths converted."""
    from omegaconf import Container, OmegaConf

    if isinstance(value, Container):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, str | bytes):
        return value.item()
    return value


# -- where sets live ----------------------------------------------------------------------------------------------


def package_principles_dir() -> Path:
    """The package's sets: ``enigma_lightning/conf/principles``."""
    return Path(str(importlib.resources.files("enigma_lightning.conf") / "principles"))


def user_principles_dir() -> Path:
    """The user's sets: ``<config root>/principles`` (``$ENIGMA_CONF``, else ``$XDG_CONFIG_HOME/enigma_lightning``,
    default ``~/.config/enigma_lightning``). It need not exist; :func:`save_principle_set` creates it."""
    return config_root() / "principles"


def staged_principles_dir() -> Path:
    """Where ``principles=/path/to/set.yaml`` is staged: ``<cache>/principle_files/principles``."""
    return principle_files_root() / "principles"


def _roots() -> list[tuple[str, Path]]:
    """(source, folder) in Hydra's search path order: the package first, then the user's, then staged files."""
    return [("package", package_principles_dir()), ("user", user_principles_dir()),
            ("staged", staged_principles_dir())]


def find_principle_set(name: str) -> tuple[str, Path] | None:
    """(source, file) of the set ``principles=<name>`` selects: ``package``, ``user`` or ``staged``; None if none."""
    parts = name.split("/")
    if not name or any(p in ("", ".", "..") for p in parts) or name.startswith("~"):
        return None
    for source, root in _roots():
        path = root.joinpath(*parts[:-1], parts[-1] + ".yaml")
        if path.is_file():
            return source, path
    return None


def is_principle_path(value: str) -> bool:
    """Whether ``principles=<value>`` names a file rather than a set: it ends in .yaml/.yml, or it holds a ``/`` (or
    starts with ``~``) and is not the name of a set (user sets in sub-folders, staged ``files/<name>-<hash>``)."""
    if value.lower().endswith(YAML_SUFFIXES):
        return True
    return ("/" in value or value.startswith("~")) and find_principle_set(value) is None


def list_principle_sets() -> list[tuple[str, str, Path]]:
    """(name, source, file) of every set ``principles=<name>`` can select: the package's (``package``), then the
    user's (``user``; one named like a package set is listed but shadowed, never selected). Staged files are left
    out."""
    out = []
    for source, root in _roots()[:2]:
        if root.is_dir():
            files = sorted(p for p in root.rglob("*.yaml") if p.is_file())
            out += [(p.relative_to(root).with_suffix("").as_posix(), source, p) for p in files]
    return out


def _names_hint() -> str:
    by = {"package": [], "user": []}
    for name, source, _ in list_principle_sets():
        by[source].append(name)
    return (f"package sets: {', '.join(by['package'])}; yours ({user_principles_dir()}): "
            f"{', '.join(by['user']) or 'none yet'}; or a file: principles=/path/to/set.yaml")


# -- reading and checking ---------------------------------------------------------------------------------------


def _suggest_name(name: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_-") or "my_set"
    return (clean if clean[0].isalpha() else f"set_{clean}")[:64]


def _type(value: Any) -> str:
    return {str: "text", int: "number", float: "number", bool: "true/false", list: "list", dict: "mapping",
            type(None): "nothing"}.get(type(value), type(value).__name__)


def _key_problems(data: dict) -> list[str]:
    out = []
    for key in data:
        if key not in KEYS:
            close = difflib.get_close_matches(str(key), KEYS, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            out.append(f"unknown key `{key}`{hint}: a principle set takes {', '.join(KEYS)}. Remove or rename it")
    target = data.get("_target_")
    if "_target_" in data and target != TARGET:
        out.append(f"`_target_: {target}` is refused: a principle set file can only build {TARGET} (nothing else is "
                   f"run from it). Set `_target_: {TARGET}` or remove the line")
    return out


def _text_problems(data: dict) -> list[str]:
    out = []
    text = data.get("text")
    if "text" not in data:
        out.append("has no `text`: add `text: |` followed by the principles, indented on the lines below (the text "
                   "training prompts carry)")
    elif not isinstance(text, str):
        out.append(f"`text` must be text; got a {_type(text)}. Write `text: |` followed by the principles, indented")
    elif not text.strip():
        out.append("`text` is empty: write the principles under `text: |`, indented on the lines below")
    for key in ("description", "antithesis"):
        if data.get(key) is not None and not isinstance(data[key], str):
            out.append(f"`{key}` must be text; got a {_type(data[key])}. Write `{key}: |` and the text indented "
                       "below")
    return out


def _list_problems(data: dict) -> list[str]:
    out = []
    variants = data.get("variants")
    fix = "Write them as a list: `variants:`, then `  - |` for each, its text indented below"
    if variants is not None and not isinstance(variants, list):
        out.append(f"`variants` must be a list of texts; got a {_type(variants)}. {fix}")
    elif variants:
        out += [f"`variants` item {i} is a {_type(v)}, not a text. {fix}"
                for i, v in enumerate(variants) if not isinstance(v, str)]
    for key in ("si", "provenance"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            out.append(f"`{key}` must be a mapping (`{key}:` then indented `key: value` lines) or absent; "
                       f"got a {_type(data[key])}")
    return out


def _name_problems(data: dict, stem: str, hydra: bool) -> list[str]:
    name = data.get("name")
    if name is None:
        if hydra:
            return [f"has no `name`: add `name: {stem}` (Hydra reads this file as it is)"]
        if not NAME.fullmatch(stem):
            return [f"has no `name`, and its file name {stem!r} is not a valid set name: add "
                    f"`name: {_suggest_name(stem)}`, or rename the file"]
        return []
    if not isinstance(name, str) or not NAME.fullmatch(name):
        return [f"`name: {name}` is not a valid set name (letters, digits, _ and -, starting with a letter, at most "
                f"64). Set `name: {_suggest_name(str(name))}`"]
    return []


def _strings(value: Any, key: str):
    """(key, string) for every string in a value, nested ones included."""
    if isinstance(value, str):
        yield key, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{key}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{key}[{i}]")


def _interpolation_problems(data: dict) -> list[str]:
    """``${`` in any text: Hydra would resolve it (another setting, an environment variable), and its ``instantiate``
    resolves an escaped ``\\${`` too, so a set cannot carry it literally."""
    return [f"`{key}` holds `${{`, which Hydra reads as an interpolation (another setting, an environment variable) "
            "and cannot carry as text: write it another way, e.g. `$ {`" for k in FIELDS if k in data
            for key, s in _strings(data[k], k) if "${" in s]


def principle_problems(data: Any, stem: str, hydra: bool = False) -> list[str]:
    """What is wrong with a principle set read from a file named ``<stem>.yaml`` (each with its fix); [] if fine.

    ``hydra``: the file is read by Hydra as it is (a package or user set, selected by name), so it must hold
    ``_target_`` and ``name``."""
    if data is None:
        return ["is empty. Write at least `text: |` followed by the principles, indented on the lines below"]
    if not isinstance(data, dict):
        return [f"holds a {_type(data)}, not a mapping of keys. Write it as `name: ...`, `text: |` (the principles "
                f"indented below), `antithesis: |`, `variants:`, like {package_principles_dir() / 'high_si.yaml'}"]
    out = _key_problems(data) + _name_problems(data, stem, hydra) + _text_problems(data) + _list_problems(data)
    if hydra and "_target_" not in data:
        out.append(f"has no `_target_`: add `_target_: {TARGET}` as its first line (Hydra builds the set from it)")
    return out + _interpolation_problems(data)


def _read_yaml(path: Path) -> Any:
    """The YAML data in ``path`` (``yaml.safe_load``: plain data, no objects), or an error naming the file (and the
    line)."""
    if not path.exists():
        raise EnigmaError(f"principles: no file {path} (relative paths start at {Path.cwd()}). Check the path, or "
                          f"choose a set by name ({_names_hint()})")
    if not path.is_file():
        raise EnigmaError(f"principles: {path} is a folder; give a principle set file, {path}/<name>.yaml")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        problem = f"not UTF-8 text ({e.reason} at byte {e.start}). Save it as UTF-8"
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = (f"not valid YAML ({where}{getattr(e, 'problem', None) or e}). Fix the syntax there; multi-line "
                   "text goes in a block, `text: |` with the lines indented below it")
    except OSError as e:
        problem = f"cannot be read ({e.strerror}). Check its permissions"
    raise EnigmaError(f"principle set {path}: {problem}")


def load_principle_file(path: str | Path, hydra: bool = False) -> PrincipleSet:
    """The set in a YAML file, read with ``yaml.safe_load`` and checked (:func:`principle_problems`); ``name``
    defaults to the file's stem. Every problem is reported at once, in an :class:`EnigmaError` naming the file."""
    path = Path(path).expanduser()
    data = _read_yaml(path)
    if problems := principle_problems(data, path.stem, hydra):
        if len(problems) == 1:
            raise EnigmaError(f"principle set {path}: {problems[0]}")
        listed = "".join(f"\n  - {p}" for p in problems)
        raise EnigmaError(f"principle set {path} has {len(problems)} problems:{listed}")
    values = {k: v for k, v in data.items() if k in FIELDS and v is not None}
    return PrincipleSet(**{"name": path.stem, **values})


def principle_set(name_or_path: str | Path) -> PrincipleSet:
    """The set a name or a path selects, as ``principles=<name or path>`` does: a package set, else a user set (else
    a staged ``files/<name>-<hash>``); a path (:func:`is_principle_path`) is read as a file."""
    value = str(name_or_path)
    if is_principle_path(value):
        return load_principle_file(value)
    found = find_principle_set(value)
    if found is None:
        raise EnigmaError(f"principles: no set named {value!r} ({_names_hint()})")
    return load_named_set(*found)


def load_named_set(source: str, path: Path) -> PrincipleSet:
    """The set in a file Hydra reads by name (:func:`find_principle_set`), checked as Hydra will read it; a package
    or user set's ``name`` must be its file's name (runs are selected by the one and reported by the other)."""
    ps = load_principle_file(path, hydra=True)
    if source != "staged" and ps.name != path.stem:
        raise EnigmaError(f"principle set {path}: `name: {ps.name}` differs from its file name {path.name}: the set "
                          f"is selected by file name and reported by name; rename the file to {ps.name}.yaml or set "
                          f"`name: {path.stem}`")
    return ps


# -- writing ------------------------------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Multi-line strings in block style (``text: |``), as the package's sets are written."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def principle_set_yaml(ps: PrincipleSet) -> str:
    """The set as a ready-to-use YAML body (``_target_`` first; ``si`` and ``provenance`` only when set)."""
    data = {"_target_": TARGET, **{k: _plain(getattr(ps, k)) for k in KEYS[1:]}}
    data = {k: v for k, v in data.items() if v is not None and not (k == "description" and not v)}
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=110)


def _header(ps: PrincipleSet, usage: str) -> str:
    lines = [f"Principle set {ps.name}" + (f": {ps.description}" if ps.description else ""),
             f"Use it in any command: python -m enigma_lightning.train {usage} (also si, evaluate, probe;",
             f"in a sweep: --multirun principles=default,{usage.split('=', 1)[1]})."]
    return "".join(f"# {line}\n" for line in lines)


def _write(path: Path, text: str) -> None:
    """Write atomically: a reader (another job of the same sweep) sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_principle_set(ps: PrincipleSet, path: str | Path | None = None) -> Path:
    """Write a set as a ready-to-use YAML file and return its path: by default ``<user principles dir>/<name>.yaml``,
    selected with ``principles=<name>``; elsewhere (``path``, a file or a folder) it is used as ``principles=<path>``.

    A name a package set has is refused (the package's set would always be selected instead); so is a set with
    problems (:func:`principle_problems`). An existing file is replaced."""
    data = {"_target_": TARGET, **{k: _plain(getattr(ps, k)) for k in FIELDS}}
    if problems := principle_problems({k: v for k, v in data.items() if v is not None}, str(ps.name)):
        raise EnigmaError(f"save: principle set {ps.name!r}: " + "; ".join(problems))
    package = package_principles_dir() / f"{ps.name}.yaml"
    if package.is_file():
        raise EnigmaError(f"save: {ps.name!r} is the name of a package principle set ({package}); principles="
                          f"{ps.name} would always select the package's. Give yours another name, e.g. "
                          f"name={ps.name}_mine")
    user = user_principles_dir()
    target = Path(path).expanduser() if path is not None else user / f"{ps.name}.yaml"
    target = target / f"{ps.name}.yaml" if target.is_dir() else target
    by_name = target.parent.absolute() == user.absolute()
    if by_name and target.stem != ps.name:
        raise EnigmaError(f"save: {target} is in your principles folder, where a set's file is named after it: "
                          f"save it as {user / (ps.name + '.yaml')}")
    _write(target, _header(ps, f"principles={ps.name}" if by_name else f"principles={target.absolute()}")
           + principle_set_yaml(ps))
    return target


def stage_principle_file(path: str | Path) -> str:
    """Check the set in a file and stage a copy where Hydra finds it; returns its option, ``files/<name>-<hash>``
    (``principles=files/<name>-<hash>``). The hash is the content's: the same file stages once, two files with one
    name never overwrite each other (jobs of a sweep may compose later, from the staged copy)."""
    source = Path(path).expanduser().absolute()
    ps = load_principle_file(source)
    body = principle_set_yaml(ps)
    option = f"{FILES_PREFIX}{ps.name}-{hashlib.sha256(body.encode()).hexdigest()[:8]}"
    staged = staged_principles_dir() / f"{option}.yaml"
    if not staged.is_file():
        _write(staged, f"# Staged copy of {source} (principles={source}); named by a hash of its content.\n{body}")
    return option
