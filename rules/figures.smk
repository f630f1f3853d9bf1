# Figures and summary tables, each registered for `snakemake --report`.


rule plot_steering:
    input:
        sweeps=steering_sweeps_of_model,
    output:
        multiplier_effect=report(
            "reports/figures/steering/{model}/multiplier_effect.png",
            caption="../reports/captions/steering_multiplier_effect.rst",
            labels=measured_label("steering"),
            category="Steering",
            subcategory="{model}",
        ),
        by_layer=report(
            "reports/figures/steering/{model}/by_layer.png",
            caption="../reports/captions/steering_by_layer.rst",
            labels=measured_label("steering"),
            category="Steering",
            subcategory="{model}",
        ),
        modes=report(
            "reports/figures/steering/{model}/modes.png",
            caption="../reports/captions/steering_modes.rst",
            labels=measured_label("steering"),
            category="Steering",
            subcategory="{model}",
        ),
        nonsense=report(
            "reports/figures/steering/{model}/nonsense.png",
            caption="../reports/captions/steering_nonsense.rst",
            labels=measured_label("steering"),
            category="Steering",
            subcategory="{model}",
        ),
        summary=report(
            "reports/tables/steering/{model}/summary.csv",
            caption="../reports/captions/table_steering_summary.rst",
            category="Steering",
            subcategory="{model}",
        ),
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
            labels=measured_label("lens"),
            category="Tuned lens",
        ),
        tuned=report(
            "reports/figures/lens/ce_tuned_lens.png",
            caption="../reports/captions/lens_tuned.rst",
            labels=measured_label("lens"),
            category="Tuned lens",
        ),
        table=report(
            "reports/tables/lens/ce_by_layer.csv",
            caption="../reports/captions/table_lens.rst",
            category="Tuned lens",
        ),
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
        shortcuts="data/quirky/{dataset}/shortcuts.csv",
    output:
        probes=report(
            "reports/figures/quirky/{base}/{dataset}/probes.png",
            caption="../reports/captions/quirky_probes.rst",
            labels=measured_label("quirky"),
            category="Quirky models",
            subcategory="{base} / {dataset}",
        ),
        anomaly=report(
            "reports/figures/quirky/{base}/{dataset}/anomaly.png",
            caption="../reports/captions/quirky_anomaly.rst",
            labels=measured_label("quirky"),
            category="Quirky models",
            subcategory="{base} / {dataset}",
        ),
        accuracy=report(
            "reports/figures/quirky/{base}/{dataset}/accuracy.png",
            caption="../reports/captions/quirky_accuracy.rst",
            labels=measured_label("quirky"),
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
            labels=measured_label("training"),
            category="Models trained here",
        ),
        table=report(
            "reports/tables/pretraining/training.csv",
            caption="../reports/captions/table_training.rst",
            category="Models trained here",
        ),
    log:
        "logs/plot_training/plot_training.log",
    benchmark:
        "logs/plot_training/plot_training.benchmark.tsv"
    conda:
        "../envs/workflow.yaml"
    script:
        "../workflow_scripts/rule_plot_training.py"


rule results_page:
    input:
        **results_tables(),
        # The figures too: the page links them, so it is written once they exist.
        figures=[
            *all_steering_figures(),
            *all_lens_figures(),
            *all_quirky_figures(),
            *all_training_figures(),
            *all_text_steering_figures(),
            *all_sae_figures(),
        ],
    output:
        page="reports/results.md",
    log:
        "logs/results_page/results_page.log",
    benchmark:
        "logs/results_page/results_page.benchmark.tsv"
    conda:
        "../envs/workflow.yaml"
    params:
        quirky=[(base, dataset) for base in config["quirky"]["models"] for dataset in config["quirky"]["datasets"]],
        quirky_datasets=list(config["quirky"]["datasets"]),
        ceiling=SAE["ceiling"],
        floor=SAE["floor"],
    script:
        "../workflow_scripts/rule_results_page.py"
