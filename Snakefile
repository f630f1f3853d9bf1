# Does transformer interpretability transfer to RNNs? One workflow, every figure.
# Thin by design: paths and params live in rules/*.smk, the work in workflow_scripts/.

from snakemake.utils import min_version

min_version("9.0")


# --configfile replaces the default run instead of being merged into it (model lists must not mix).
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/models.smk"
include: "rules/pretraining.smk"
include: "rules/activations.smk"
include: "rules/steering.smk"
include: "rules/text_steering.smk"
include: "rules/lens.smk"
include: "rules/quirky.smk"
include: "rules/sae.smk"
include: "rules/figures.smk"


# Rules that download run on the submitting machine under a cluster executor (compute nodes often have
# no network); the other jobs read what they fetched (profiles/slurm, `make prefetch`).
localrules:
    build_model,
    prepare_behaviors,


rule all:
    default_target: True
    input:
        all_activations(),
        all_steering_figures(),
        all_lens_figures(),
        all_quirky_figures(),
        all_training_figures(),
        all_text_steering_figures(),
        all_sae_figures(),
        "reports/results.md",
