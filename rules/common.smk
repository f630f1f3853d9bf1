# Shared helpers: config validation (before any job), wildcard constraints, input and param lookups.

import re
import sys

sys.path.insert(0, workflow.basedir)

from workflow_scripts.configuration import (
    ConfigError,
    check_config_cached,
    finetuned_model_spec,
    model_n_layers,
    steering_modes,
)

try:
    _checked = check_config_cached(config, ".snakemake/checked-configs")
except ConfigError as error:
    raise WorkflowError(str(error)) from None
config.clear()
config.update(_checked)


# Prompt sets are the configured ones, one contrast set per behaviour ("behavior-<name>"), and two
# per quirky dataset ("quirky-<name>": statements, "quirky-<name>-pairs": with " False" / " True").
BEHAVIOR_PROMPT_SETS = {f"behavior-{name}": name for name in config["behaviors"]}
QUIRKY_PROMPT_SETS = {
    **{f"quirky-{name}": f"data/quirky/{name}/statements.jsonl" for name in config["quirky"]["datasets"]},
    **{f"quirky-{name}-pairs": f"data/quirky/{name}/pairs.jsonl" for name in config["quirky"]["datasets"]},
}


def finetuned_name(base, dataset):
    """A model fine-tuned on a quirky dataset is the model "<base>+<dataset>" (also as a path pattern:
    finetuned_name("{base}", "{dataset}"))."""
    return f"{base}+{dataset}"


def model_manifest(model):
    """Where build_model (or finetune_quirky) writes a model's manifest; later jobs load the model from
    it. `model` may be a wildcard pattern such as "{model}"."""
    return f"data/models/{model}/manifest.json"


def activation_file(model, prompt_set):
    """Where extract_activations writes a model's activations on a prompt set (patterns allowed)."""
    return f"data/activations/{model}/{prompt_set}.parquet"


FINETUNED_MODELS = {
    finetuned_name(base, dataset): (base, dataset)
    for base in config["quirky"]["models"]
    for dataset in config["quirky"]["datasets"]
}

# Memory (MB) and run time (minutes) of each model rule's jobs, sized for the models of the default
# run; a retry (--retries) doubles both. profiles/slurm/config.yaml sizes them for 3B-7B models.
JOB_SIZES = {
    "build_model": (4000, 30),
    "extract_activations": (8000, 120),
    "compute_steering_vectors": (8000, 120),
    "evaluate_steering": (8000, 240),
    "train_tuned_lens": (16000, 720),
    "evaluate_lens": (16000, 120),
    "finetune_quirky": (16000, 720),
    "answer_quirky": (8000, 60),
    "fit_probes": (8000, 240),
    "train_model": (8000, 720),
    "steer_text_kinds": (8000, 240),
}


def job_memory(rule_name):
    return lambda wildcards, attempt: JOB_SIZES[rule_name][0] * attempt


def job_minutes(rule_name):
    return lambda wildcards, attempt: JOB_SIZES[rule_name][1] * attempt


def _alternatives(names):
    return "|".join(re.escape(name) for name in names) or "(?!)"


BASE_MODELS = _alternatives(config["models"])
# Models the pipeline trains (by train_model) and those build_model materializes; one producer each.
TRAINED = [name for name, spec in config["models"].items() if "trained" in spec["source"]]
TRAINED_MODELS = _alternatives(TRAINED)
BUILT_MODELS = _alternatives([name for name in config["models"] if name not in TRAINED])


wildcard_constraints:
    model=_alternatives([*config["models"], *FINETUNED_MODELS]),
    base=BASE_MODELS,
    dataset=_alternatives(config["quirky"]["datasets"]),
    prompt_set=_alternatives([*config["prompt_sets"], *BEHAVIOR_PROMPT_SETS, *QUIRKY_PROMPT_SETS]),
    behavior=_alternatives(config["behaviors"]),
    tokenizer=_alternatives(config["pretraining"]["tokenizers"]),


def model_spec(wildcards):
    if "model" not in wildcards.keys():  # the finetune rule names the model by base and dataset
        return finetuned_model_spec(config, wildcards.base, f"data/models/{wildcards.base}+{wildcards.dataset}/weights")
    if wildcards.model in FINETUNED_MODELS:
        base, _ = FINETUNED_MODELS[wildcards.model]
        return finetuned_model_spec(config, base, f"data/models/{wildcards.model}/weights")
    return config["models"][wildcards.model]


def tokenizer_settings(wildcards):
    return config["pretraining"]["tokenizers"][wildcards.tokenizer]


def trained_model_tokenizer(output):
    """Input function: the prepare_tokenizer output `output` of a trained model's tokenizer."""

    def path(wildcards):
        name = config["models"][wildcards.model]["source"]["trained"]["tokenizer"]
        return getattr(rules.prepare_tokenizer.output, output).format(tokenizer=name)

    return path


def base_model_spec(wildcards):
    return config["models"][wildcards.base]


def prompt_set_path(wildcards):
    if wildcards.prompt_set in BEHAVIOR_PROMPT_SETS:
        return f"data/behaviors/{BEHAVIOR_PROMPT_SETS[wildcards.prompt_set]}/contrast.jsonl"
    if wildcards.prompt_set in QUIRKY_PROMPT_SETS:
        return QUIRKY_PROMPT_SETS[wildcards.prompt_set]
    return config["prompt_sets"][wildcards.prompt_set]["path"]


def prompt_set_template(wildcards):
    if wildcards.prompt_set in BEHAVIOR_PROMPT_SETS:
        return "chat"
    if wildcards.prompt_set in QUIRKY_PROMPT_SETS:
        return "raw"
    return config["prompt_sets"][wildcards.prompt_set]["template"]


def quirky_dataset_settings(wildcards):
    return config["quirky"]["datasets"][wildcards.dataset]


def quirky_source_files(wildcards):
    """A local published dataset's files are inputs, so replacing one reruns that dataset's jobs."""
    local = config["quirky"]["datasets"][wildcards.dataset].get("source", {}).get("local")
    if local is None:
        return {}
    return {split: f"{local}/{split}.parquet" for split in ("train", "validation", "test")}


def behavior_source(wildcards):
    return config["behaviors"][wildcards.behavior]


def behavior_source_files(wildcards):
    """A local behaviour's files are inputs, so editing one reruns only that behaviour's jobs."""
    local = config["behaviors"][wildcards.behavior].get("local")
    if local is None:
        return {}
    return {
        "generate": f"{local}/generate_dataset.json",
        "test": f"{local}/test_dataset_ab.json",
    }


def behavior_settings(wildcards):
    keys = ("max_generate_items", "max_test_items", "on_malformed")
    return {key: config["steering"][key] for key in keys}


def steering_sweep_settings(wildcards):
    keys = ("multipliers", "layers", "positions", "formats", "vectors", "layers_per_pass")
    settings = {key: config["steering"][key] for key in keys}
    return {**settings, "modes": steering_modes(config, wildcards.model)}


def text_passage_settings(wildcards):
    keys = ("kinds", "passage_chars", "passages_per_document", "vector_passages", "eval_passages")
    return {key: config["text_steering"][key] for key in keys}


def text_steering_settings(wildcards):
    # The passage settings are in the passages file (an input); the list of models is not a setting.
    return {key: value for key, value in config["text_steering"].items() if key != "models"}


def steers_state(wildcards):
    """Whether the model's modes need state deltas (the adapter decides whether it has a state)."""
    return bool({"state", "both"} & set(steering_modes(config, wildcards.model)))


def steering_sweeps_of_model(wildcards):
    return expand(
        "data/steering/{model}/{behavior}/sweep.parquet",
        model=wildcards.model,
        behavior=config["behaviors"],
    )


def all_lens_figures():
    models = config["lens"]["models"]
    if not models:
        return []
    return [
        "reports/figures/lens/ce_logit_lens.png",
        *expand("reports/figures/lens/{model}/trajectory.png", model=models),
    ]


def all_quirky_figures():
    return expand(
        "reports/figures/quirky/{base}/{dataset}/{figure}.png",
        base=config["quirky"]["models"],
        dataset=config["quirky"]["datasets"],
        figure=["probes", "anomaly", "accuracy"],
    )


def all_text_steering_figures():
    if not config["text_steering"]["models"]:
        return []
    return ["reports/figures/text_steering/kind_shift.png", "reports/figures/text_steering/kind_shift_by_layer.png"]


def all_training_figures():
    if not TRAINED:
        return []
    return ["reports/figures/pretraining/training_curves.png"]


def all_activations():
    return expand(
        activation_file("{model}", "{prompt_set}"),
        model=config["models"],
        prompt_set=config["prompt_sets"],
    )


def all_steering_figures():
    if not config["behaviors"]:
        return []
    return expand(
        "reports/figures/steering/{model}/{figure}.png",
        model=config["steering"]["models"],
        figure=["multiplier_effect", "by_layer", "modes", "nonsense"],
    )


# ----- sparse autoencoders (rules/sae.smk) ---------------------------------------------------------
SAE = config["sae"]
SAE_MODELS = SAE["models"]
# Every unordered pair, in config order: model_a is the one listed first.
SAE_PAIRS = [(a, b) for i, a in enumerate(SAE_MODELS) for b in SAE_MODELS[i + 1 :]]


def sae_tokens(wildcards):
    """The token chunks of the model's pretraining tokenizer: the shared token set is drawn from them."""
    name = config["models"][wildcards.model]["source"]["trained"]["tokenizer"]
    return rules.prepare_tokenizer.output.tokens.format(tokenizer=name)


def sae_layers(wildcards):
    if SAE["layers"] == "all":
        return list(range(model_n_layers(wildcards.model, config["models"][wildcards.model])))
    return SAE["layers"]


def all_sae_figures():
    if not SAE_MODELS:
        return []
    return [
        "reports/figures/sae/mppc_heatmaps.png",
        "reports/figures/sae/max_correlations.png",
        "reports/figures/sae/shift_curve.png",
    ]


# ----- the results page (rule results_page in rules/figures.smk) ----------------------------------
def results_tables():
    """Every summary table this config's experiments write, by experiment; the results page is written
    from these alone."""
    quirky = config["quirky"]
    return {
        "training": ["reports/tables/pretraining/training.csv"] if TRAINED else [],
        "lens": ["reports/tables/lens/ce_by_layer.csv"] if config["lens"]["models"] else [],
        "steering": (
            expand("reports/tables/steering/{model}/summary.csv", model=config["steering"]["models"])
            if config["behaviors"]
            else []
        ),
        "text_steering": ["reports/tables/text_steering/summary.csv"] if config["text_steering"]["models"] else [],
        "quirky_accuracy": expand(
            "data/quirky/answers/{base}/{dataset}/accuracy.csv", base=quirky["models"], dataset=quirky["datasets"]
        ),
        "quirky_probes": expand(
            "data/quirky/probes/{base}/{dataset}/auroc.csv", base=quirky["models"], dataset=quirky["datasets"]
        ),
        "quirky_anomaly": expand(
            "data/quirky/probes/{base}/{dataset}/anomaly.csv", base=quirky["models"], dataset=quirky["datasets"]
        ),
        "quirky_shortcuts": expand("data/quirky/{dataset}/shortcuts.csv", dataset=quirky["datasets"]),
        "sae_metrics": ["reports/tables/sae/sae_metrics.csv"] if SAE_MODELS else [],
        "sae_shift": ["reports/tables/sae/shift.csv"] if SAE_MODELS else [],
    }


def measured_label(experiment):
    """Report labels filled from the job's own tables when the report is made (the tables exist by
    then; nothing is read while the workflow runs): the figure's name and what was measured, in the
    results page's words."""

    def label(wildcards, input, output):
        from workflow_scripts.results_page import measured_labels

        return measured_labels(experiment, dict(input.items()), dict(output.items()), dict(wildcards.items()))

    return label
