"""lm-evaluation-harness tasks on a trained policy (``pip install 'enigma-lightning[lmeval]'``).

    python -m enigma_lightning.lm_eval ckpt_path=<run dir>/policy "tasks=[truthfulqa_mc1,gpqa_main_zeroshot]"
    python -m enigma_lightning.lm_eval ckpt_path=<run dir>/policy tasks=[my_task] include_path=<folder of task YAMLs>
    python -m enigma_lightning.lm_eval model=<hub id or folder> tasks=[truthfulqa_mc1]          # an untrained baseline

An exported ``policy/`` folder (a transformers model) is evaluated through lm-eval's ``hf`` model with
``pretrained=<folder>``, exactly as ``lm_eval --model hf --model_args pretrained=<folder>`` would; a Lightning
checkpoint, a LoRA adapter folder or a model preset (``embedded:``, ``tiny:``) is loaded as ``evaluate`` loads it and
handed to the same ``hf`` model as an instance. Tasks are lm-eval's (``lm_eval --tasks list``) or your own YAMLs in
``include_path`` (a local file: ``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``). Unlike
``evaluate``, lm-eval uses its own prompts, not the training chat prompt.

Outputs in the output folder: ``lm_eval.json`` (lm-eval's results, versions and task configs), ``lm_eval.md`` (its
table), ``samples_<task>.jsonl`` with ``log_samples=true``, and a W&B run (``lm_eval/<task>/<metric>``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..errors import EnigmaError
from ..runtime.cli import hydra_command


def _is_plain_folder(path: str | None) -> bool:
    """A transformers model folder lm-eval's ``hf`` model loads itself (not a LoRA adapter)."""
    p = Path(str(path)).expanduser() if path else None
    return p is not None and p.is_dir() and (p / "config.json").exists() and not (p / "adapter_config.json").exists()


def lm(cfg: DictConfig, device: str) -> tuple[Any, dict[str, Any] | None]:
    """(model, model_args) for ``lm_eval.simple_evaluate``: ``"hf"`` and ``pretrained=<folder>`` for an exported
    folder, else lm-eval's ``HFLM`` around the policy ``evaluate`` would load."""
    from ..runtime.checkpoints import load_policy_from

    if _is_plain_folder(cfg.ckpt_path):
        return "hf", {"pretrained": str(Path(str(cfg.ckpt_path)).expanduser().resolve()), "dtype": "auto"}
    from lm_eval.models.huggingface import HFLM

    model, tok = load_policy_from(cfg)
    return HFLM(pretrained=model.to(device), tokenizer=tok, batch_size=cfg.batch_size), None


def check(cfg: DictConfig):
    """The task manager, after checking ``tasks`` and ``include_path`` (each problem names its key and the fix)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise EnigmaError(f"lm_eval needs lm-evaluation-harness ({e}). Install it: pip install "
                          "'enigma-lightning[lmeval]'") from None
    tasks = list(cfg.tasks or [])
    if not tasks:
        raise EnigmaError("tasks selects nothing. Set \"tasks=[truthfulqa_mc1,gpqa_main_zeroshot]\" (lm_eval --tasks "
                          "list shows them all)")
    include = cfg.get("include_path")
    if include and not Path(str(include)).expanduser().is_dir():
        raise EnigmaError(f"include_path: folder {include!r} does not exist. Point it at a folder of lm-eval task "
                          "YAMLs, or set include_path=null")
    tm = TaskManager(include_path=str(Path(str(include)).expanduser()) if include else None)
    known = set(tm.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        where = f" nor in include_path={include}" if include else ""
        raise EnigmaError(f"tasks: {unknown} are not lm-eval tasks{where}. Use names from `lm_eval --tasks list` "
                          "(e.g. truthfulqa_mc1, gpqa_main_zeroshot), or put your task's YAML in a folder and set "
                          "include_path=<folder>")
    if cfg.limit is not None and not (isinstance(cfg.limit, int | float) and cfg.limit > 0):
        raise EnigmaError(f"limit must be a number of examples per task (> 0) or null; got {cfg.limit!r}. Set limit=null")
    return tm


def run(cfg: DictConfig) -> dict[str, Any]:
    from ..runtime.checkpoints import merge_run_config

    cfg = merge_run_config(cfg)
    tm = check(cfg)
    import lm_eval
    from lm_eval.utils import make_table

    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    from ..runtime.checkpoints import device_for

    device = str(device_for(cfg.device))
    model, model_args = lm(cfg, device)
    results = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot,
        batch_size=cfg.batch_size, device=device, limit=cfg.limit, task_manager=tm, log_samples=cfg.log_samples,
        apply_chat_template=cfg.apply_chat_template, bootstrap_iters=cfg.bootstrap_iters, random_seed=cfg.seed,
        numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed)
    if results is None:  # a non-zero rank
        return {}
    samples = results.pop("samples", None) or {}
    for task, rows in samples.items():
        with open(out / f"samples_{task}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r, default=str) + "\n")
    what = str(cfg.ckpt_path or cfg.model.name_or_path)
    report = {"model": what, **results}
    (out / "lm_eval.json").write_text(json.dumps(report, indent=2, default=str))
    table = f"# lm-eval: {what}\n\n{make_table(results)}"
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    (out / "lm_eval.md").write_text(table)
    print(table)
    print(f"wrote {out / 'lm_eval.json'}, {out / 'lm_eval.md'}")
    _log_wandb(cfg, out, results["results"])
    return report


def _log_wandb(cfg: DictConfig, out: Path, results: dict[str, dict[str, Any]]) -> None:
    from ..runtime.loggers import wandb_run

    run = wandb_run(cfg, out, "lm_eval")
    if run is None:
        return
    for task, metrics in results.items():
        run.summary.update({f"lm_eval/{task}/{k.replace(',', '/')}": v for k, v in metrics.items()
                            if isinstance(v, int | float) and not (isinstance(v, float) and math.isnan(v))})
    run.finish()


main, cli = hydra_command(run, "lm_eval")


if __name__ == "__main__":
    cli()
