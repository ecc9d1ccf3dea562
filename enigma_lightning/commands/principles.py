"""Principle sets: list them, and create new ones whose Sufficiency Index is measured before they are used.

    python -m enigma_lightning.principles list
    python -m enigma_lightning.principles create from=high_si candidates=8            # the policy writes
    python -m enigma_lightning.principles create from=/path/set.yaml writer=<hub id or folder> keep=3

``create`` works as SAMI's principle writer does (Franken et al. 2024, arXiv 2404.14313: a language model writes
principles and their antitheses, from which constitutions are drawn): a writer model, shown one worked rewrite,
drafts ``candidates`` rewrites of the ``from`` set's text, each with its antithesis. Drafts that cannot be used are
rejected with the reason (no antithesis, empty, the antithesis identical to the principle, a copy of the source or of
the worked example or of an earlier draft, too long for the context, unfinished). Every usable draft, and the
``from`` set for comparison, is measured as ``python -m enigma_lightning.si`` measures a set: SI on
``num_questions`` held-out questions with the null control and its permutation p-value. The best ``keep`` drafts
separated from the null are measured again on ``confirm_questions`` other held-out questions (the ranking's own
figure is biased upward by picking the best) and written as principle sets, with that SI and their provenance,
where ``principles=<name>`` finds them.

Outputs in the run folder: ``candidates.jsonl`` and ``candidates.md`` (every draft: its text, status, reason and
SI), ``samples.jsonl`` (the CoTs every SI was computed from), ``sets/<name>.yaml`` (copies of the written sets);
the candidates are logged to W&B as a table.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from .si import describe, load_model, load_questions, measure, write_samples

WRITER_SYSTEM = ("You write principles for an assistant that answers questions and shows its reasoning step by step. "
                 "A good principle changes what the reasoning looks like, so that a reader can tell from the reasoning "
                 "alone whether it was followed. Its antithesis asks for the opposite, just as concretely. Keep each "
                 "to one or two sentences.")
WRITER_REQUEST = "Rewrite this principle and write its antithesis.\n\nPrinciple: {text}"
# one worked rewrite shown to the writer (drafts that copy it are rejected)
EXAMPLE = ("Be careful and precise.",
           "Write every number with digits and every step as an equation, such as 4 + 5 = 9, then check the result.",
           "Never write a digit or an equation; spell every number out in words and tell the steps as a story.")
PREFILL = "Principle:"


@dataclass
class Draft:
    index: int
    raw: str
    text: str = ""
    antithesis: str = ""
    status: str = "usable"  # usable | rejected | not separated | ranked out | written
    reason: str = ""
    origin: str = "writer"  # writer | the drafts file it came from


def writer_prompt(tok, text: str) -> str:
    """The writer's chat: its instructions, one worked rewrite, the request; the answer opens with ``Principle:``."""
    messages = [{"role": "system", "content": WRITER_SYSTEM},
                {"role": "user", "content": WRITER_REQUEST.format(text=EXAMPLE[0])},
                {"role": "assistant", "content": f"Principle: {EXAMPLE[1]}\nAntithesis: {EXAMPLE[2]}"},
                {"role": "user", "content": WRITER_REQUEST.format(text=" ".join(text.split()))}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + PREFILL


def parse_draft(raw: str, truncated: bool) -> tuple[str, str, str]:
    """(principle, antithesis, reason it is unusable or '') of a writer's answer ``Principle: ... Antithesis: ...``.
    The antithesis is the line after ``Antithesis:``."""
    m = re.match(rf"\s*{PREFILL}\s*(.*?)\s*(?:\n|^|\s)Antithesis:\s*(.*)", raw, re.S)
    if not m:
        return " ".join(raw.removeprefix(PREFILL).split()), "", "no antithesis (the draft has no 'Antithesis:' part)"
    text, rest = m.group(1), m.group(2)
    ended = re.search(r"\n", rest)  # one line, as in the worked example
    antithesis = rest[: ended.start()] if ended else rest
    text, antithesis = " ".join(text.split()), " ".join(antithesis.split())
    if truncated and not ended and not antithesis.endswith((".", "!", "?")):
        return text, antithesis, "unfinished: the writer stopped at writer_max_new_tokens mid-antithesis"
    return text, antithesis, ""


def file_drafts(path: str, start: int) -> list[Draft]:
    """Drafts written elsewhere (by hand, or by a larger model as SAMI's were): a JSON Lines file of
    ``{"text": ..., "antithesis": ...}``, measured and ranked with the writer's."""
    from ..errors import EnigmaError

    file = Path(path).expanduser()
    if not file.is_file():
        raise EnigmaError(f"drafts={path}: no such file. Give a JSON Lines file of {{\"text\": ..., \"antithesis\": ...}}")
    out = []
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EnigmaError(f"drafts={path}, line {n}: not JSON ({e.msg}). Each line is "
                              '{"text": "...", "antithesis": "..."}') from None
        if not isinstance(row, dict) or not isinstance(row.get("text", ""), str) or not isinstance(
                row.get("antithesis", ""), str):
            raise EnigmaError(f"drafts={path}, line {n}: expected an object with string fields text and antithesis")
        text, antithesis = " ".join(row.get("text", "").split()), " ".join(row.get("antithesis", "").split())
        out.append(Draft(start + len(out), line, text, antithesis, origin=str(file)))
    return out


def _norm(s: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", s.lower()).split())


def check_draft(d: Draft, earlier: list[Draft], source: str, count_tokens, max_tokens: int, fits) -> str:
    """Why a parsed draft cannot be used ('' when it can)."""
    if not d.text:
        return "empty principle"
    if not d.antithesis:
        return "empty antithesis"
    if _norm(d.text) == _norm(d.antithesis):
        return "the antithesis is the principle itself"
    if _norm(d.text) == _norm(source):
        return "the source set's text, unchanged"
    if _norm(d.text) == _norm(EXAMPLE[1]) or _norm(d.antithesis) == _norm(EXAMPLE[2]):
        return "a copy of the writer's worked example"
    for e in earlier:
        if e.status != "rejected" and (_norm(e.text), _norm(e.antithesis)) == (_norm(d.text), _norm(d.antithesis)):
            return f"the same as draft {e.index}"
    for part, s in (("principle", d.text), ("antithesis", d.antithesis)):
        if (n := count_tokens(s)) > max_tokens:
            return f"too long: the {part} has {n} tokens > max_principle_tokens={max_tokens}"
        if not fits(s):
            return f"too long for the context: the training prompt with the {part} exceeds rollout.max_prompt_length"
    return ""


def draft(writer, writer_tok, source_text: str, cfg: DictConfig) -> list[Draft]:
    """``cfg.candidates`` drafts sampled from the writer, each from its own seed (seed, index). A draft that gives a
    principle but stops before its antithesis (small writers often do) is asked for the antithesis of that principle
    in a second pass (the answer so far, then ``Antithesis:``); its ``origin`` says so."""
    from ..rollout.hf import generate
    from ..rollout.sampling import SamplingConfig

    sampling = SamplingConfig(max_new_tokens=cfg.writer_max_new_tokens, min_new_tokens=0,
                              temperature=cfg.writer_temperature, top_p=cfg.writer_top_p, top_k=0,
                              repetition_penalty=1.0, max_prompt_length=None, long_prompts="error",
                              seed_per_prompt=True, reserve_cache=True, share_prompts=True)
    if not cfg.candidates:
        return []
    prompt = writer_prompt(writer_tok, source_text)
    ro = generate(writer, writer_tok, [prompt], cfg.candidates, sampling, prefill=PREFILL,
                  seeds=[cfg.seed * 100_003 + i for i in range(cfg.candidates)])
    out = []
    for i, (raw, truncated) in enumerate(zip(ro.completions, ro.truncated.tolist(), strict=True)):
        text, antithesis, reason = parse_draft(raw, truncated)
        out.append(Draft(i, raw, text, antithesis, "rejected" if reason else "usable", reason))
    retry = [d for d in out if d.reason.startswith("no antithesis") and _first_line(d.raw)]
    if retry:
        heads = [f"{PREFILL} {_first_line(d.raw)}\nAntithesis:" for d in retry]
        again = generate(writer, writer_tok, [prompt + h.removeprefix(PREFILL) for h in heads], 1, sampling,
                         seeds=[cfg.seed * 100_003 + 50_000 + d.index for d in retry])
        for d, head, tail, truncated in zip(retry, heads, again.completions, again.truncated.tolist(), strict=True):
            d.raw = head + tail
            d.text, d.antithesis, d.reason = parse_draft(d.raw, truncated)
            d.status, d.origin = "rejected" if d.reason else "usable", "writer (antithesis asked separately)"
    return out


def _first_line(raw: str) -> str:
    """The principle a draft starts with: its first line after ``Principle:``."""
    return " ".join(raw.removeprefix(PREFILL).strip().split("\n", 1)[0].split())


def _targets(cfg: DictConfig, source_name: str) -> tuple[Path, list[str]]:
    """The folder and names the kept sets will be written to; refuses, before any model loads, names that exist."""
    from ..data.principles import list_principle_sets, user_principles_dir
    from ..errors import EnigmaError

    folder = Path(cfg.out_dir).expanduser() if cfg.out_dir else user_principles_dir()
    base = cfg.name or f"{source_name}_w"
    names = [f"{base}{i + 1}" if base.endswith("_w") else f"{base}_{i + 1}" for i in range(cfg.keep)]
    package = {n for n, where, _ in list_principle_sets() if where == "package"}
    if clash := [n for n in names if n in package]:
        raise EnigmaError(f"name={base}: {', '.join(clash)} would shadow the package's set(s) of that name. "
                          "Choose another name=")
    if not cfg.overwrite and (exist := [str(folder / f"{n}.yaml") for n in names if (folder / f"{n}.yaml").exists()]):
        raise EnigmaError(f"{', '.join(exist)} already exist(s). Choose another name=, or overwrite=true")
    return folder, names


def _table(drafts: list[Draft], results: dict[int, dict], source: dict) -> str:
    def si_cells(r: dict | None) -> str:
        if not r:
            return "- | - | - | -"
        return (f"{r['si']:.4f} [{r['si_ci_low']:.4f}, {r['si_ci_high']:.4f}] | {r['p_value']:.4f} "
                f"| {r['cots_differ']:.0%} | {r.get('confirm_si', float('nan')):.4f}" if "confirm_si" in r else
                f"{r['si']:.4f} [{r['si_ci_low']:.4f}, {r['si_ci_high']:.4f}] | {r['p_value']:.4f} "
                f"| {r['cots_differ']:.0%} | -")

    def cut(s: str, n: int = 90) -> str:
        s = s.replace("|", "\\|")
        return s if len(s) <= n else s[: n - 1] + "…"

    lines = ["| draft | status | SI [95% CI] | p vs null | CoTs differ | SI (confirmation) | principle | antithesis "
             "| reason |", "|---|---|---|---|---|---|---|---|---|",
             f"| source: {source['set']} | - | {si_cells(source)} | {cut(source['variants'][0])} "
             f"| {cut(source['variants'][1])} | |"]
    for d in drafts:
        lines.append(f"| {d.index} | {d.status} | {si_cells(results.get(d.index))} | {cut(d.text)} "
                     f"| {cut(d.antithesis)} | {cut(d.reason, 120)} |")
    return "\n".join(lines) + "\n"


def _si_record(r: dict, questions: str, cfg: DictConfig) -> dict[str, Any]:
    keys = ("si", "si_ci_low", "si_ci_high", "null_si", "null_low", "null_high", "p_value", "cots_differ",
            "mi_bound", "acc_row", "acc_col", "num_questions", "num_variants")
    return {**{k: r[k] for k in keys if k in r}, "questions": questions, "decoding": cfg.decoding,
            "model": cfg.model.name_or_path, "max_new_tokens": cfg.rollout.max_new_tokens}


def create(cfg: DictConfig) -> dict[str, Any]:
    from hydra.utils import instantiate

    from ..data.principles import PrincipleSet, principle_set, save_principle_set
    from ..errors import EnigmaError
    from ..models.loading import load_policy, load_tokenizer

    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = principle_set(str(cfg["from"]))
    variants = source.all_variants()[: cfg.num_variants]
    if cfg.num_variants != 2:
        raise EnigmaError(f"num_variants={cfg.num_variants}: a draft is a principle and its antithesis, K = 2. "
                          "Set num_variants=2")
    if len(variants) < 2:
        raise EnigmaError(f"from={cfg['from']} has no antithesis; its SI (the comparison for the drafts) needs one. "
                          "Add `antithesis:` to the set")
    if cfg.candidates < 0 or cfg.keep < 0 or (cfg.candidates == 0 and not cfg.drafts):
        raise EnigmaError(f"candidates={cfg.candidates} and keep={cfg.keep} must be >= 0, and there must be drafts to "
                          "measure: candidates >= 1, or drafts=<file>")
    extra = file_drafts(cfg.drafts, cfg.candidates) if cfg.drafts else []
    folder, names = _targets(cfg, source.name)
    questions = load_questions(cfg.questions, cfg.num_questions, cfg.seed)
    confirm = load_questions(cfg.questions, cfg.confirm_questions, cfg.seed, offset=cfg.num_questions)
    tok, model, prompt, sampling = load_model(cfg)
    writer_tok, writer = tok, model
    if cfg.writer and cfg.candidates:
        spec = instantiate(cfg.model, name_or_path=cfg.writer)
        writer_tok, writer = load_tokenizer(spec), load_policy(spec).eval().to(next(model.parameters()).device)
    t0 = time.perf_counter()
    drafts = draft(writer, writer_tok, source.text, cfg) + extra
    writing_s = time.perf_counter() - t0
    del writer

    def fits(s: str) -> bool:
        limit = sampling.max_prompt_length
        return not limit or len(tok(prompt.render(tok, max(questions, key=len), s)).input_ids) <= limit

    for d in drafts:
        if d.status == "usable" and (reason := check_draft(d, drafts[: d.index], source.text,
                                                           lambda s: len(tok(s).input_ids), cfg.max_principle_tokens,
                                                           fits)):
            d.status, d.reason = "rejected", reason
    print(f"{cfg.candidates} drafts written in {writing_s:.0f} s" + (f", {len(extra)} from {cfg.drafts}" if extra else "")
          + f"; {sum(d.status == 'usable' for d in drafts)} of {len(drafts)} usable")
    src, samples = measure(model, tok, prompt, sampling, source.name, variants, questions, cfg)
    src["variants"] = variants
    print("source " + describe(src))
    results: dict[int, dict] = {}
    for d in drafts:
        if d.status == "usable":
            results[d.index], rows = measure(model, tok, prompt, sampling, f"draft_{d.index}", [d.text, d.antithesis],
                                             questions, cfg)
            samples += rows
            print(f"draft {d.index}: " + describe(results[d.index]))
            write_samples(samples, out / "samples.jsonl")
    ranked = sorted(results, key=lambda i: -results[i]["si"])
    written = []
    for i in ranked:
        d, r = drafts[i], results[i]
        if cfg.require_separation and not r["separated"]:
            d.status, d.reason = "not separated", f"p = {r['p_value']:.4f} >= alpha = {cfg.alpha}"
        elif len(written) == cfg.keep:
            d.status, d.reason = "ranked out", f"{cfg.keep} better draft(s) kept"
        else:
            name = names[len(written)]
            c, rows = measure(model, tok, prompt, sampling, name, [d.text, d.antithesis], confirm, cfg)
            samples += rows
            r["confirm_si"] = c["si"]
            ps = PrincipleSet(
                name=name, text=d.text, antithesis=d.antithesis,
                description=f"Drafted by {cfg.writer or cfg.model.name_or_path} from {source.name}; SI "
                            f"{c['si']:.4f} [{c['si_ci_low']:.4f}, {c['si_ci_high']:.4f}] on held-out questions",
                si={**_si_record(c, f"{cfg.questions}[{cfg.num_questions}:{cfg.num_questions + cfg.confirm_questions}]"
                                    f" (seed {cfg.seed})", cfg),
                    "ranking": _si_record(r, f"{cfg.questions}[0:{cfg.num_questions}] (seed {cfg.seed})", cfg),
                    "source_si": src["si"]},
                provenance={"command": "python -m enigma_lightning.principles create " + " ".join(sys.argv[1:]),
                            "from": source.name, "from_text": source.text,
                            "writer": cfg.writer or cfg.model.name_or_path, "draft": d.index,
                            "candidates": cfg.candidates, "seed": cfg.seed, "temperature": cfg.writer_temperature,
                            "created": time.strftime("%Y-%m-%d %H:%M:%S"), "run_dir": str(out)})
            path = save_principle_set(ps, folder / f"{name}.yaml")
            (out / "sets").mkdir(exist_ok=True)
            (out / "sets" / f"{name}.yaml").write_text(path.read_text())
            d.status, d.reason = "written", f"principles={name} ({path})"
            written.append({"name": name, "path": str(path), "draft": d.index, "si": c["si"],
                            "si_ci_low": c["si_ci_low"], "si_ci_high": c["si_ci_high"], "p_value": c["p_value"]})
            print(f"wrote {path}: " + describe(c))
    write_samples(samples, out / "samples.jsonl")
    with open(out / "candidates.jsonl", "w") as f:
        for d in drafts:
            f.write(json.dumps({**asdict(d), "si": results.get(d.index)}) + "\n")
    table = _table(drafts, results, src)
    (out / "candidates.md").write_text(table)
    print(table)
    if not written:
        print(f"no draft was written: none of the {len(results)} measured drafts was separated from the null "
              "(more candidates=, another writer=, or require_separation=false)" if results else
              "no draft was written: every draft was rejected (see the reasons above)")
    _log_wandb(cfg, out, drafts, results, src)
    return {"source": src, "drafts": [asdict(d) for d in drafts], "results": results, "written": written}


def _log_wandb(cfg: DictConfig, out: Path, drafts: list[Draft], results: dict[int, dict], src: dict) -> None:
    from ..runtime.loggers import wandb_run

    run = wandb_run(cfg, out, "principles")
    if run is None:
        return
    import wandb

    cols = ["draft", "status", "reason", "principle", "antithesis", "si", "si_ci_low", "si_ci_high", "p_value",
            "cots_differ", "confirm_si"]
    data = [[d.index, d.status, d.reason, d.text, d.antithesis,
             *[results.get(d.index, {}).get(k) for k in cols[5:]]] for d in drafts]
    run.summary.update({"principles/source_si": src["si"], "principles/usable": len(results),
                        "principles/written": sum(d.status == "written" for d in drafts)})
    run.log({"principles/candidates": wandb.Table(columns=cols, data=data)})
    run.finish()


def list_sets() -> None:
    """Every set principles=<name> can select: the package's and yours, with the SI recorded in created sets."""
    import yaml

    from ..data.principles import list_principle_sets, user_principles_dir

    print(f"{'name':<24} {'where':<8} {'SI (recorded)':<24} path")
    for name, where, path in list_principle_sets():
        data = yaml.safe_load(Path(path).read_text()) or {}
        si = data.get("si") or {}
        figure = f"{si['si']:.4f} [{si['si_ci_low']:.4f}, {si['si_ci_high']:.4f}]" if "si_ci_low" in si else "-"
        print(f"{name:<24} {where:<8} {figure:<24} {path}")
    print(f"\nyour sets live in {user_principles_dir()} ($ENIGMA_CONF/principles); a set's file also works as "
          "principles=/path/set.yaml")


USAGE = """usage: python -m enigma_lightning.principles {list,create} [key=value ...]

  list                 the principle sets principles=<name> can select (the package's and yours)
  create from=<set>    draft rewrites of a set with a writer model, measure their SI, write the best as new sets
                       (settings: conf/principles_create.yaml; e.g. candidates=8 keep=2 writer=<model>)
"""


def cli() -> None:
    from ..runtime.cli import entry_point, hydra_command

    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    if args[0] == "list":
        list_sets()
        return
    if args[0] != "create":
        print(f"error: unknown command {args[0]!r}\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0], *args[1:]]
    main, _ = hydra_command(create, "principles_create")
    entry_point(main)


if __name__ == "__main__":
    cli()
