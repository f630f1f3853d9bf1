# Figures and summary tables, each registered for `snakemake --report`.


rule plot_steering:
    input:
        sweeps=steering_sweeps_of_model,
    output:
        multiplier_effect=report(
            "reports/figures/steering/{model}/multiplier_effect.png",
            caption="../reports/captions/steering_multiplier_effect.rst",
            category="Steering",
            subcategory="{model}",
        ),
        by_layer=report(
            "reports/figures/steering/{model}/by_layer.png",
            caption="../reports/captions/steering_by_layer.rst",
            category="Steering",
            subcategory="{model}",
        ),
        modes=report(
            "reports/figures/steering/{model}/modes.png",
            caption="../reports/captions/steering_modes.rst",
            category="Steering",
            subcategory="{model}",
        ),
        nonsense=report(
            "reports/figures/steering/{model}/nonsense.png",
            caption="../reports/captions/steering_nonsense.rst",
            category="Steering",
            subcategory="{model}",
        ),
        summary="reports/tables/steering/{model}/summary.csv",
    log:
        "logs/plot_steering/{model}.log",
    benchmark:
        "logs/plot_steering/{model}.benchmark.tsv"
    conda:
        "../envs/workflow.yaml"
    script:
        "../workflow_scripts/rule_plot_steering.py"


rule plot_lens:
    input:
        evaluations=expand("data/lens/{model}/evaluation.csv", model=config["lens"]["models"]),
    output:
        logit=report(
            "reports/figures/lens/ce_logit_lens.png",
            caption="../reports/captions/lens_logit.rst",
            category="Tuned lens",
        ),
        tuned=report(
            "reports/figures/lens/ce_tuned_lens.png",
            caption="../reports/captions/lens_tuned.rst",
            category="Tuned lens",
        ),
        table="reports/tables/lens/ce_by_layer.csv",
    log:
        "logs/plot_lens/plot_lens.log",
    benchmark:
        "logs/plot_lens/plot_lens.benchmark.tsv"
    conda:
        "../envs/workflow.yaml"
    script:
        "../workflow_scripts/rule_plot_lens.py"


rule plot_trajectory:
    input:
        trajectory="data/lens/{model}/trajectory.parquet",
    output:
        figure=report(
            "reports/figures/lens/{model}/trajectory.png",
            caption="../reports/captions/lens_trajectory.rst",
            category="Tuned lens",
            subcategory="{model}",
        ),
    log:
        "logs/plot_trajectory/{model}.log",
    benchmark:
        "logs/plot_trajectory/{model}.benchmark.tsv"
    conda:
        "../envs/workflow.yaml"
    script:
        "../workflow_scripts/rule_plot_trajectory.py"


rule plot_quirky:
    input:
        auroc="data/quirky/probes/{base}/{dataset}/auroc.csv",
        anomaly="data/quirky/probes/{base}/{dataset}/anomaly.csv",
        manifest=model_manifest(finetuned_name("{base}", "{dataset}")),
        accuracy="data/quirky/answers/{base}/{dataset}/accuracy.csv",
    output:
        probes=report(
            "reports/figures/quirky/{base}/{dataset}/probes.png",
            caption="../reports/captions/quirky_probes.rst",
            category="Quirky models",
            subcategory="{base} / {dataset}",
        ),
        anomaly=report(
            "reports/figures/quirky/{base}/{dataset}/anomaly.png",
            caption="../reports/captions/quirky_anomaly.rst",
            category="Quirky models",
            subcategory="{base} / {dataset}",
        ),
        accuracy=report(
            "reports/figures/quirky/{base}/{dataset}/accuracy.png",
            caption="../reports/captions/quirky_accuracy.rst",
            category="Quirky models",
            subcategory="{base} / {dataset}",
        ),
    log:
        "logs/plot_quirky/{base}/{dataset}.log",
    benchmark:
        "logs/plot_quirky/{base}/{dataset}.benchmark.tsv"
    conda:
        "../envs/workflow.yaml"
    script:
        "../workflow_scripts/rule_plot_quirky.py"


rule plot_training:
    input:
        histories=expand("data/models/{model}/training.csv", model=TRAINED),
    output:
        curves=report(
            "reports/figures/pretraining/training_curves.png",
            caption="../reports/captions/training_curves.rst",
            category="Models trained here",
        ),
        table="reports/tables/pretraining/training.csv",
    log:
        "logs/plot_training/plot_training.log",
    benchmark:
        "logs/plot_training/plot_training.benchmark.tsv"
    conda:
        "../envs/workflow.yaml"
    script:
        "../workflow_scripts/rule_plot_training.py"
