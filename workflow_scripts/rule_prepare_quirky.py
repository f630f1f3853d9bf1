"""Rule prepare_quirky: one quirky arithmetic dataset (Alice tells the truth, Bob errs systematically),
and its two prompt sets: the statements, and each statement followed by " False" and " True"."""

import json

from workflow_scripts.atomic import atomic_path, atomic_write_text
from workflow_scripts.jobs import start_job
from workflow_scripts.quirky_data import (
    ANSWERS, MAX_SHORTCUT_AUROC, from_published, generate_quirky, load_published, shortcut_aurocs,
)

sm = snakemake  # noqa: F821 - injected by Snakemake
log = start_job(sm)
settings = dict(sm.params.settings)
if "source" in settings:  # a published dataset
    splits = load_published(settings["source"])
    table = from_published(splits, settings["operation"], settings["n_problems"], seed=sm.params.seed)
else:
    table = generate_quirky(
        settings.pop("operation"), settings.pop("n_problems"), seed=sm.params.seed,
        split_fractions=tuple(settings.pop("split_fractions")),
        operand_range=tuple(settings.pop("operand_range")) if "operand_range" in settings else None, **settings,
    )
with atomic_path(sm.output.table) as tmp:
    table.to_parquet(tmp, index=False)
statements = [
    {"id": row.id, "prompt": row.statement, "label": int(row.truth_label), "split": row.split}
    for row in table.itertuples()
]
pairs = [
    {**line, "id": f"{line['id']}|{answer_index}", "completion": answer}
    for line in statements for answer_index, answer in enumerate(ANSWERS)
]
atomic_write_text(sm.output.statements, "".join(json.dumps(line) + "\n" for line in statements))
atomic_write_text(sm.output.pairs, "".join(json.dumps(line) + "\n" for line in pairs))
# Can the claim alone (size, digits, last digit) tell the truth on a test subset? Then probes can cheat.
shortcuts = shortcut_aurocs(table)
with atomic_path(sm.output.shortcuts) as tmp:
    shortcuts.to_csv(tmp, index=False)
leaks = shortcuts[shortcuts["auroc"] > MAX_SHORTCUT_AUROC]
if len(leaks):
    log.warning(
        "the claim alone predicts the truth on %d test subset(s) at AUROC > %.2f, so probes may score without the "
        "arithmetic (widen operand_range or use fewer problems):\n%s", len(leaks), MAX_SHORTCUT_AUROC, leaks.to_string()
    )
log.info("%d rows: %s", len(table), table.groupby(["split", "character"]).size().to_dict())
