"""A W&B workspace (saved view) with the panels an ENIGMA user looks at first, built with W&B's workspace API:

    python -m enigma_lightning.dashboard entity=<entity> project=<project> [name="ENIGMA"] [group=<sweep>]

Sections: rewards and format rate; GRPO (clip ratios, KL, advantages); SAMI (MI bound, SI, identification
accuracy); OT (Sinkhorn divergence, cloud size); validation (accuracy, format rate, best accuracy); geometry
probes; speed (step time, phase shares, tokens/s); sample completions (the ``samples/completions`` table). Runs are
grouped by their W&B group (one group per sweep, see :mod:`enigma_lightning.sweeps`); ``group=<sweep>`` keeps only
that sweep's runs. Without an API key (or with ``dry_run=true``) the view is built and printed, not saved.
Needs ``pip install 'enigma-lightning[dashboard]'`` (wandb-workspaces).
"""

from __future__ import annotations

import sys
from typing import Any

from ..errors import EnigmaError
from ..metrics.names import metric

# (section, [(panel title, [metric keys])]); a table panel is written as (title, "table:<key>")
LAYOUT: list[tuple[str, list[tuple[str, Any]]]] = [
    ("Reward and format", [
        ("reward", [metric("train/reward/mean")]),
        ("reward terms", [metric("train/reward/format/mean"), metric("train/reward/correctness/mean")]),
        ("strict-format rate", [metric("train/format/strict_rate")]),
        ("reward std / zero-std groups", [metric("train/reward/std"), metric("train/reward/frac_zero_std")]),
        ("completion length", [metric("train/completions/mean_length"), metric("train/completions/clipped_ratio")]),
    ]),
    ("GRPO", [
        ("clip ratio", [metric("train/grpo/clip_ratio"), metric("train/grpo/clip_ratio_low"), metric("train/grpo/clip_ratio_high")]),
        ("KL to reference", [metric("train/grpo/kl")]),
        ("loss", [metric("train/loss"), metric("train/grpo/loss")]),
        ("|advantage|", [metric("train/advantages/abs_mean")]),
    ]),
    ("SAMI", [
        ("MI lower bound (nats)", [metric("train/sami/mi_bound")]),
        ("Sufficiency Index", [metric("train/sami/si")]),
        ("identification accuracy", [metric("train/sami/acc_row"), metric("train/sami/acc_col")]),
        ("InfoNCE loss", [metric("train/sami/loss")]),
    ]),
    ("OT", [
        ("Sinkhorn divergence", [metric("train/ot/divergence")]),
        ("points per cloud", [metric("train/ot/points")]),
    ]),
    ("Validation", [
        ("accuracy", [metric("val/accuracy"), metric("val/accuracy_best")]),
        ("format rate", [metric("val/format_rate")]),
    ]),
    ("Geometry probes", [
        ("Sinkhorn / Fisher-Rao (last layer)", [metric("probe/sinkhorn/last"), metric("probe/fisher_rao/last")]),
        ("linear CKA", [metric("probe/cka/mean"), metric("probe/cka/last")]),
        ("principle alignment", [metric("probe/principle_alignment/mean"), metric("probe/principle_alignment/last")]),
    ]),
    ("Speed", [
        ("step time (s)", [metric("perf/step_time")]),
        ("phase share of the step", [metric("perf/generation_share"), metric("perf/reference_share"), metric("perf/grpo_share"),
                                     metric("perf/sami_share"), metric("perf/ot_share")]),
        ("completion tokens / s", [metric("perf/tokens_per_s")]),
    ]),
    ("Samples", [("sample completions", "table:samples/completions")]),
]


def build(entity: str, project: str, name: str = "ENIGMA", group: str | None = None):
    """The workspace object (not saved)."""
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as e:
        raise EnigmaError("the dashboard needs wandb-workspaces: pip install 'enigma-lightning[dashboard]'") from e

    sections = []
    for title, panels in LAYOUT:
        built = []
        for panel_title, what in panels:
            if isinstance(what, str) and what.startswith("table:"):
                built.append(wr.WeavePanelSummaryTable(table_name=what.removeprefix("table:")))
            else:
                built.append(wr.LinePlot(title=panel_title, x="Step", y=list(what)))
        sections.append(ws.Section(name=title, panels=built, is_open=True))
    runset = ws.RunsetSettings(groupby=[ws.Metric("Group")],
                               filters=[ws.Metric("Group") == group] if group else "")
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections, runset_settings=runset,
                        settings=ws.WorkspaceSettings(x_axis="Step", max_runs=50))


def describe(workspace) -> str:
    lines = [f"W&B workspace {workspace.name!r} for {workspace.entity}/{workspace.project}"]
    for s in workspace.sections:
        lines.append(f"  [{s.name}]")
        for p in s.panels:
            what = getattr(p, "y", None) or [getattr(p, "table_name", "")]
            lines.append(f"    - {getattr(p, 'title', None) or type(p).__name__}: {', '.join(map(str, what))}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from ..runtime.cli import exit_on_user_error
    from ..runtime.loggers import wandb_has_credentials

    args = dict(a.split("=", 1) for a in (sys.argv[1:] if argv is None else argv) if "=" in a)
    unknown = set(args) - {"entity", "project", "name", "group", "dry_run"}
    with exit_on_user_error():
        if unknown or not args.get("entity") or not args.get("project"):
            raise EnigmaError("usage: python -m enigma_lightning.dashboard entity=<entity> project=<project> "
                              "[name=<view name>] [group=<sweep>] [dry_run=true]"
                              + (f"; unknown keys: {sorted(unknown)}" if unknown else ""))
        workspace = build(args["entity"], args["project"], args.get("name", "ENIGMA"), args.get("group"))
        print(describe(workspace))
        if args.get("dry_run", "false").lower() == "true" or not wandb_has_credentials():
            print("\nnot saved (no W&B API key, or dry_run=true); run `wandb login` and again to save the view")
            return
        workspace.save()
        print(f"\nsaved: {workspace.url}")


if __name__ == "__main__":
    main()
