"""Users' own principle sets: a user folder on Hydra's search path, ``principles=/path/to/set.yaml`` on the command
line, safe loading with clear errors, and saved sets that compose back to the same set. No model is loaded."""

import sys
import warnings

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from enigma_lightning.data.principles import (
    FIELDS,
    KEYS,
    PrincipleSet,
    list_principle_sets,
    load_principle_file,
    principle_set,
    save_principle_set,
    stage_principle_file,
    user_principles_dir,
)
from enigma_lightning.errors import EnigmaError
from enigma_lightning.runtime.cli import entry_point, rewrite_principles
from enigma_lightning.runtime.validate import config_problems

MINE = PrincipleSet(name="mine", description="Mine, measured.",
                    text="Show every step.\nCheck the result: $ {x} and \\n stay as they are.\n",
                    antithesis="Skip the steps.", variants=["Explain it to a child.\nUse no symbols.\n"],
                    si={"si": 0.0071, "ci": [0.0047, 0.0097], "controls": {"shuffled": 0.0001}},
                    provenance={"created_by": "test", "from": ["high_si"]})


@pytest.fixture(autouse=True)
def roots(tmp_path, monkeypatch):
    """The user's config root and the cache in the test's folder (never the real ~/.config or ~/.cache)."""
    monkeypatch.setenv("ENIGMA_CONF", str(tmp_path / "conf"))
    monkeypatch.setenv("ENIGMA_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _compose(*overrides: str, config: str = "train"):
    with initialize_config_module("enigma_lightning.conf", version_base="1.3"):
        return compose(config, overrides=list(overrides))


def _write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _error(fn, *args) -> str:
    with pytest.raises(EnigmaError) as e:
        fn(*args)
    return str(e.value)


def test_keys_are_the_fields():
    assert set(KEYS) == {"_target_", *FIELDS}


def test_saved_set_composes_back_to_an_equal_set(tmp_path):
    path = save_principle_set(MINE)
    assert path == tmp_path / "conf" / "principles" / "mine.yaml" == user_principles_dir() / "mine.yaml"
    text = path.read_text()
    assert text.startswith("# Principle set mine: Mine, measured.\n# Use it") and "principles=mine" in text
    body = [line for line in text.splitlines() if not line.startswith("#")]
    assert body[0] == "_target_: enigma_lightning.data.principles.PrincipleSet"
    assert "text: |" in body and "  Show every step." in body  # block style, as the package's sets
    for config in ("train", "si", "evaluate", "probe"):
        cfg = _compose("principles=mine", config=config)
        ps = instantiate(cfg.principles)  # no _convert_: containers still come back plain
        assert ps == MINE and type(ps.si) is dict and type(ps.variants) is list, config
    assert principle_set("mine") == MINE == load_principle_file(path, hydra=True)
    assert ("mine", "user", path) in list_principle_sets()


def test_training_builds_the_module_config_with_a_saved_set(make_cfg):
    save_principle_set(MINE)
    cfg = make_cfg("principles=mine", "loss=[grpo,sami]", "sami.num_variants=3", "step.num_generations=3",
                   "data.batch_size=6")
    assert config_problems(cfg) == []  # validation reads cfg.principles.*: si/provenance are settings it takes
    assert instantiate(cfg.module.principles, _convert_="all") == MINE


def test_a_missing_user_folder_is_fine(tmp_path):
    assert not (tmp_path / "conf").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = _compose("principles=high_si")
    assert cfg.principles.name == "high_si"
    assert {source for _, source, _ in list_principle_sets()} == {"package"}


def test_a_user_set_never_shadows_a_package_set(tmp_path):
    with pytest.raises(EnigmaError, match="'high_si' is the name of a package principle set .* another name"):
        save_principle_set(PrincipleSet(name="high_si", text="Mine."))
    shadow = _write(user_principles_dir() / "high_si.yaml",
                    "_target_: enigma_lightning.data.principles.PrincipleSet\nname: high_si\ntext: Mine.\n")
    assert _compose("principles=high_si").principles.text.startswith("Work like an auditor")  # the package's
    assert principle_set("high_si").text.startswith("Work like an auditor")
    argv, notes = rewrite_principles(["principles=high_si"])
    assert argv == ["principles=high_si"] and str(shadow) in notes[0] and "never selected" in notes[0]


def test_the_path_form_is_staged_and_composes(tmp_path, monkeypatch):
    path = _write(tmp_path / "sets" / "auditor.yaml", "text: |\n  Write every number with digits.\n"
                                                       "antithesis: Spell every number out.\n")
    (argv, notes) = rewrite_principles([f"principles={path}", "x=1"])
    assert notes == [] and argv[1] == "x=1"
    option = argv[0].removeprefix("principles=")
    assert option.startswith("files/auditor-")
    assert (tmp_path / "cache" / "principle_files" / "principles" / f"{option}.yaml").is_file()
    ps = instantiate(_compose(argv[0]).principles)
    assert ps == load_principle_file(path) == principle_set(str(path)) == principle_set(option)
    assert ps.name == "auditor" and ps.antithesis == "Spell every number out."  # name: the file's stem
    monkeypatch.chdir(tmp_path / "sets")  # a relative path, and the same content stages once
    assert rewrite_principles(["principles=auditor.yaml"])[0] == argv[:1]


def test_two_files_with_one_name_do_not_collide(tmp_path):
    a = _write(tmp_path / "a" / "s.yaml", "text: A\n")
    b = _write(tmp_path / "b" / "s.yaml", "text: B\n")
    first, second = stage_principle_file(a), stage_principle_file(b)
    assert first != second and first.startswith("files/s-") and second.startswith("files/s-")
    assert [instantiate(_compose(f"principles={o}").principles).text for o in (first, second)] == ["A", "B"]


def test_comma_lists_and_sets_are_rewritten_element_by_element(tmp_path):
    path = _write(tmp_path / "p" / "a.yaml", "name: set_a\ntext: Be brief.\nantithesis: Ramble.\n")
    save_principle_set(MINE)
    (argv, _) = rewrite_principles([f"principles=high_si,{path},mine", f"sets=[high_si,{path},mine]"])
    staged = stage_principle_file(path)
    assert argv == [f"principles=high_si,{staged},mine", f"sets=[high_si,{staged},mine]"]
    names = [instantiate(_compose(f"principles={o}").principles).name for o in ("high_si", staged, "mine")]
    assert names == ["high_si", "set_a", "mine"]
    cfg = _compose(argv[1], config="si")
    assert [principle_set(n).name for n in cfg.sets] == ["high_si", "set_a", "mine"]
    assert [principle_set(n).name for n in ("high_si", str(path), "mine")] == ["high_si", "set_a", "mine"]
    assert rewrite_principles([f"principles=choice(mine,{path})"])[0] == [f"principles=choice(mine,{staged})"]
    # other sweep functions and other keys pass unchanged
    assert rewrite_principles(["principles=glob(*)", "model=x/y"])[0] == ["principles=glob(*)", "model=x/y"]


def test_entry_point_rewrites_the_command_line(tmp_path, monkeypatch):
    path = _write(tmp_path / "a.yaml", "text: Be brief.\n")
    seen = []
    monkeypatch.setattr(sys, "argv", ["enigma-train", "--multirun", f"principles=default,{path}"])
    entry_point(lambda: seen.append(list(sys.argv)))
    assert seen == [["enigma-train", "--multirun", f"principles=default,{stage_principle_file(path)}"]]


def test_a_bad_file_on_the_command_line_exits_2_naming_it(tmp_path, monkeypatch, capsys):
    path = _write(tmp_path / "a.yaml", "variants: [x]\n")
    monkeypatch.setattr(sys, "argv", ["enigma-si", f"principles={path}"])
    with pytest.raises(SystemExit) as e:
        entry_point(lambda: pytest.fail("Hydra ran"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and str(path) in err and "has no `text`: add `text: |`" in err


NOT_A_SET = [  # (file content, what the error says: the problem and its fix)
    ("text: [unclosed\n", ["not valid YAML (line 2", "Fix the syntax there"]),
    ("text: |\nbad indent\n  x: [\n", ["not valid YAML (line", "`text: |` with the lines indented"]),
    ("- a\n- b\n", ["holds a list, not a mapping", "Write it as `name: ...`"]),
    ("", ["is empty", "Write at least `text: |`"]),
    ("name: x\n", ["has no `text`", "add `text: |`"]),
    ("text: '   '\n", ["`text` is empty", "write the principles under `text: |`"]),
    ("text: 42\n", ["`text` must be text; got a number"]),
    ("text: x\ntexts: y\nfoo: 1\n", ["unknown key `texts` (did you mean `text`?)", "unknown key `foo`",
                                     "a principle set takes _target_, name, description, text, antithesis, variants, "
                                     "si, provenance. Remove or rename it", "has 2 problems"]),
    ("text: x\nvariants: one\n", ["`variants` must be a list of texts; got a text", "`variants:`, then `  - |`"]),
    ("text: x\nvariants: [a, 3]\n", ["`variants` item 1 is a number, not a text"]),
    ("text: x\nsi: 0.3\n", ["`si` must be a mapping"]),
    ("text: x\nname: 'my set!'\n", ["`name: my set!` is not a valid set name", "Set `name: my_set`"]),
    ("text: x\nname: 7up\n", ["is not a valid set name", "Set `name: set_7up`"]),
    ("text: x\n_target_: os.system\n", ["`_target_: os.system` is refused",
                                        "Set `_target_: enigma_lightning.data.principles.PrincipleSet`"]),
]


@pytest.mark.parametrize(("content", "says"), NOT_A_SET)
def test_a_malformed_file_names_the_file_and_the_fix(tmp_path, content, says):
    path = _write(tmp_path / "sets" / "bad.yaml", content)
    for fn in (load_principle_file, principle_set, stage_principle_file):
        message = _error(fn, str(path))
        assert str(path) in message, message
        for fragment in says:
            assert fragment in message, message
    assert not (tmp_path / "cache").exists()  # nothing staged


def test_file_names_and_missing_files(tmp_path):
    message = _error(load_principle_file, tmp_path / "no-such.yaml")
    assert str(tmp_path / "no-such.yaml") in message and "Check the path" in message and "high_si" in message
    assert "is a folder" in _error(load_principle_file, tmp_path)
    odd = _write(tmp_path / "my.set.yaml", "text: x\n")
    message = _error(load_principle_file, odd)
    assert str(odd) in message and "file name 'my.set' is not a valid set name: add `name: my_set`" in message
    assert load_principle_file(_write(tmp_path / "other.yaml", "name: my_set\ntext: x\n")).name == "my_set"
    assert "no set named 'nope'" in _error(principle_set, "nope")


def test_no_code_runs_from_a_principle_file(tmp_path):
    mark = tmp_path / "owned"
    tagged = _write(tmp_path / "tagged.yaml", f'text: !!python/object/apply:os.system ["touch {mark}"]\n')
    assert "not valid YAML (line 1" in _error(stage_principle_file, tagged)
    target = _write(tmp_path / "target.yaml", f"_target_: builtins.exec\ntext: open('{mark}', 'w')\n")
    assert "`_target_: builtins.exec` is refused" in _error(stage_principle_file, target)
    user = _write(user_principles_dir() / "evil.yaml", "_target_: builtins.exec\nname: evil\ntext: x\n")
    with pytest.raises(EnigmaError, match="builtins.exec` is refused"):
        rewrite_principles(["principles=evil"])
    assert str(user) in _error(principle_set, "evil")
    assert not mark.exists()


def test_user_sets_are_checked_as_hydra_reads_them(tmp_path):
    _write(user_principles_dir() / "bare.yaml", "text: x\n")
    message = _error(rewrite_principles, ["principles=bare"])
    assert "has no `name`: add `name: bare`" in message and "has no `_target_`: add `_target_: " in message
    _write(user_principles_dir() / "env.yaml", "_target_: enigma_lightning.data.principles.PrincipleSet\n"
                                               "name: env\ntext: ${oc.env:HOME}\n")
    assert "`text` holds `${`, which Hydra reads as an interpolation" in _error(principle_set, "env")
    for text in ("${oc.env:HOME}", "a \\${x}"):  # escaped or not: Hydra's instantiate resolves it
        path = _write(tmp_path / "f.yaml", f"text: '{text}'\n")
        assert "cannot carry as text: write it another way" in _error(stage_principle_file, path)
    assert "holds `${`" in _error(save_principle_set, PrincipleSet(name="ab", text="x", variants=["${y}"]))
    _write(user_principles_dir() / "named.yaml", "_target_: enigma_lightning.data.principles.PrincipleSet\n"
                                                 "name: other\ntext: x\n")
    assert "`name: other` differs from its file name named.yaml" in _error(principle_set, "named")


def test_save_refuses_a_set_with_problems_and_takes_a_path(tmp_path):
    assert "valid set name" in _error(save_principle_set, PrincipleSet(name="a b", text="x"))
    assert "`text` is empty" in _error(save_principle_set, PrincipleSet(name="ab", text=" "))
    elsewhere = save_principle_set(MINE, tmp_path / "out")  # a new file path
    assert elsewhere == tmp_path / "out" and f"principles={elsewhere}" in elsewhere.read_text()
    folder = (tmp_path / "folder")
    folder.mkdir()
    assert save_principle_set(MINE, folder) == folder / "mine.yaml"
    assert load_principle_file(folder / "mine.yaml") == MINE
    assert "named after it" in _error(save_principle_set, MINE, user_principles_dir() / "other.yaml")


def test_validation_reads_a_file_set(tmp_path, make_cfg):
    path = _write(tmp_path / "two.yaml", "text: A\nantithesis: B\n")
    (argv, _) = rewrite_principles([f"principles={path}"])
    assert config_problems(make_cfg(*argv)) == []
    problems = config_problems(make_cfg(*argv, "loss=[grpo,sami]", "sami.num_variants=3"))
    assert problems == ["sami.num_variants=3 but principles=two has 2 variants (text, antithesis, variants). "
                        "Set sami.num_variants=2 or add principles.variants"]
    problems = config_problems(make_cfg(*argv, "principles.variants=oops", "principles._target_=enigma_lightning.x"))
    assert any("principles._target_ is 'enigma_lightning.x'" in p for p in problems)
    assert any("principles.variants must be a list of texts" in p for p in problems)


def test_the_plugin_leaves_other_applications_alone():
    from hydra._internal.config_search_path_impl import ConfigSearchPathImpl

    from hydra_plugins.enigma_lightning_searchpath import EnigmaLightningSearchPathPlugin

    other = ConfigSearchPathImpl()
    other.append("main", "pkg://someone_else.conf")
    EnigmaLightningSearchPathPlugin().manipulate_search_path(other)
    assert [e.provider for e in other.get_path()] == ["main"]
    ours = ConfigSearchPathImpl()
    ours.append("main", "pkg://enigma_lightning.conf")
    EnigmaLightningSearchPathPlugin().manipulate_search_path(ours)
    assert [e.provider for e in ours.get_path()] == ["main", "enigma_lightning-user", "enigma_lightning-files"]


def test_the_command_line_takes_a_file(tmp_path):
    """The installed command, as a user runs it: the plugin is discovered and the file's set is composed."""
    from helpers import run_cli

    path = _write(tmp_path / "cli set.yaml", "name: cli_set\ntext: From a file.\n")
    r = run_cli("enigma_lightning.train", f"principles={path}", "--cfg", "job", "--package", "principles",
                timeout=300)
    assert r.returncode == 0, r.stderr
    assert "name: cli_set" in r.stdout and "text: From a file." in r.stdout
