"""Rule prepare_quirky: one quirky arithmetic dataset (Alice tells the truth, Bob errs systematically),
and its two prompt sets: the statements, and each statement followed by " False" and " True"."""

import json

from workflow_scripts.atomic import atomic_path, atomic_write_text
from workflow_scripts.jobs import start_job
from workflow_scripts.quirky_data import MAX_SHORTCUT_AUROC, make_table, prompt_sets, shortcut_aurocs

sm = snakemake  # noqa: F821 - injected by Snakemake
log = start_job(sm)
table = make_table(sm.params.settings, sm.params.seed)
with atomic_path(sm.output.table) as tmp:
    table.to_parquet(tmp, index=False)
statements, pairs = prompt_sets(table)
atomic_write_text(sm.output.statements, "".join(json.dumps(line) + "\n" for line in statements))
atomic_write_text(sm.output.pairs, "".join(json.dumps(line) + "\n" for line in pairs))
# Can the claim alone (size, digits, last or leading digit) tell the truth on a test subset? Then probes can cheat.
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
