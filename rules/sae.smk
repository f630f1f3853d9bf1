# Sparse autoencoders on models that share a tokenizer: the same token windows through every model,
# a TopK SAE per block output, then how alike the models' features are (also one token apart).


rule extract_sae_activations:
    input:
        manifest=model_manifest("{model}"),
        tokens=sae_tokens,
    output:
        parquet="data/sae/{model}/activations.parquet",
    log:
        "logs/extract_sae_activations/{model}.log",
    benchmark:
        "logs/extract_sae_activations/{model}.benchmark.tsv"
    wildcard_constraints:
        model=_alternatives(SAE_MODELS),
    conda:
        "../envs/workflow.yaml"
    resources:
        mem_mb=job_memory("extract_activations"),
        runtime=job_minutes("extract_activations"),
    params:
        spec=model_spec,
        layers=sae_layers,
        windows={key: SAE[key] for key in ("train_windows", "eval_windows", "seed")},
        batch_size=SAE["batch_windows"],
    script:
        "../workflow_scripts/rule_extract_sae_activations.py"


rule train_sae:
    input:
        manifest=model_manifest("{model}"),
        activations="data/sae/{model}/activations.parquet",
    output:
        coders=directory("data/sae/{model}/coders"),
        metrics="data/sae/{model}/metrics.csv",
        history="data/sae/{model}/training.csv",
        latents="data/sae/{model}/latents.npz",
    log:
        "logs/train_sae/{model}.log",
    benchmark:
        "logs/train_sae/{model}.benchmark.tsv"
    wildcard_constraints:
        model=_alternatives(SAE_MODELS),
    conda:
        "../envs/workflow.yaml"
    resources:
        mem_mb=job_memory("extract_activations"),
        runtime=job_minutes("extract_activations"),
    params:
        spec=model_spec,
        settings={key: SAE[key] for key in ("expansion", "k", "steps", "batch_size", "lr", "seed", "batch_windows")},
    script:
        "../workflow_scripts/rule_train_sae.py"


rule compare_sae_features:
    input:
        a="data/sae/{model_a}/latents.npz",
        b="data/sae/{model_b}/latents.npz",
    output:
        summary="data/sae/similarity/{model_a}/{model_b}.csv",
        maxima="data/sae/similarity/{model_a}/{model_b}.npz",
    log:
        "logs/compare_sae_features/{model_a}/{model_b}.log",
    benchmark:
        "logs/compare_sae_features/{model_a}/{model_b}.benchmark.tsv"
    wildcard_constraints:
        model_a=_alternatives(SAE_MODELS),
        model_b=_alternatives(SAE_MODELS),
    conda:
        "../envs/workflow.yaml"
    params:
        shifts=SAE["shifts"],
    script:
        "../workflow_scripts/rule_compare_sae_features.py"


rule plot_sae:
    input:
        metrics=expand("data/sae/{model}/metrics.csv", model=SAE_MODELS),
        summaries=[f"data/sae/similarity/{a}/{b}.csv" for a, b in SAE_PAIRS],
        maxima=[f"data/sae/similarity/{a}/{b}.npz" for a, b in SAE_PAIRS],
    output:
        heatmaps=report(
            "reports/figures/sae/mppc_heatmaps.png",
            caption="../reports/captions/sae_mppc_heatmaps.rst",
            labels=measured_label("sae"),
            category="SAE features",
        ),
        distribution=report(
            "reports/figures/sae/max_correlations.png",
            caption="../reports/captions/sae_max_correlations.rst",
            labels=measured_label("sae"),
            category="SAE features",
        ),
        shift=report(
            "reports/figures/sae/shift_curve.png",
            caption="../reports/captions/sae_shift_curve.rst",
            labels=measured_label("sae"),
            category="SAE features",
        ),
        sae_table=report(
            "reports/tables/sae/sae_metrics.csv",
            caption="../reports/captions/table_sae_metrics.rst",
            category="SAE features",
        ),
        mppc_table=report(
            "reports/tables/sae/mppc.csv", caption="../reports/captions/table_sae_mppc.rst", category="SAE features"
        ),
        shift_table=report(
            "reports/tables/sae/shift.csv", caption="../reports/captions/table_sae_shift.rst", category="SAE features"
        ),
    log:
        "logs/plot_sae/plot_sae.log",
    benchmark:
        "logs/plot_sae/plot_sae.benchmark.tsv"
    conda:
        "../envs/workflow.yaml"
    params:
        pairs=SAE_PAIRS,
        ceiling=SAE["ceiling"],
        floor=SAE["floor"],
    script:
        "../workflow_scripts/rule_plot_sae.py"
