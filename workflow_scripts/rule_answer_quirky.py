"""Rule answer_quirky: the fine-tuned model's own answers on the held-out test statements, and its
accuracy per character and difficulty (did it learn the quirk, beyond the rows that chose its
checkpoint?)."""


import pandas as pd

from workflow_scripts.adapters import load_job_adapter
from workflow_scripts.atomic import atomic_path
from workflow_scripts.quirky_answers import accuracy_table, answer_probabilities
from workflow_scripts.jobs import start_job

sm = snakemake  # noqa: F821 - injected by Snakemake
log = start_job(sm)
adapter = load_job_adapter(sm.params.spec, f"{sm.wildcards.base}+{sm.wildcards.dataset}", sm.input.manifest)
table = pd.read_parquet(sm.input.table)
test = table[table.split == "test"].reset_index(drop=True)
p_true = answer_probabilities(adapter, test, batch_size=32, allow_shared_prefix=True)
answers = test[["id", "character", "difficulty_bucket", "claim_kind", "label", "truth_label"]].assign(p_true=p_true)
accuracy = accuracy_table(test, p_true).assign(model=sm.wildcards.base, dataset=sm.wildcards.dataset)
for row in accuracy[accuracy.difficulty == "all"].itertuples():
    log.info("%s: test AUROC %.3f [%.3f, %.3f], balanced accuracy %.3f on %d statements", row.character, row.auroc,
             row.auroc_lo, row.auroc_hi, row.balanced_accuracy, row.n)
with atomic_path(sm.output.answers) as tmp:
    answers.to_parquet(tmp, index=False)
with atomic_path(sm.output.accuracy) as tmp:
    accuracy.to_csv(tmp, index=False)
