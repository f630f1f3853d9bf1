# Steering without instructions: two kinds of text -> passages -> per model, contrast vectors and their
# effect on held-out continuations -> figures.


rule prepare_text_kinds:
    output:
        passages="data/text_steering/passages.jsonl",
    log:
        "logs/prepare_text_kinds/prepare_text_kinds.log",
    benchmark:
        "logs/prepare_text_kinds/prepare_text_kinds.benchmark.tsv"
    conda:
        "../envs/workflow.yaml"
    params:
        settings=text_passage_settings,
        seed=config["seed"],
    script:
        "../workflow_scripts/rule_prepare_text_kinds.py"


rule steer_text_kinds:
    input:
        passages="data/text_steering/passages.jsonl",
        manifest=model_manifest("{model}"),
    output:
        vectors="data/text_steering/{model}/vectors.safetensors",
        sweep="data/text_steering/{model}/sweep.parquet",
    log:
        "logs/steer_text_kinds/{model}.log",
    benchmark:
        "logs/steer_text_kinds/{model}.benchmark.tsv"
    conda:
        "../envs/workflow.yaml"
    resources:
        mem_mb=job_memory("steer_text_kinds"),
        runtime=job_minutes("steer_text_kinds"),
    params:
        spec=model_spec,
        settings=text_steering_settings,
        seed=config["seed"],
    script:
        "../workflow_scripts/rule_steer_text_kinds.py"


rule plot_text_steering:
    input:
        sweeps=expand("data/text_steering/{model}/sweep.parquet", model=config["text_steering"]["models"]),
    output:
        shift=report(
            "reports/figures/text_steering/kind_shift.png",
            caption="../reports/captions/text_steering_shift.rst",
            labels=measured_label("text_steering"),
            category="Steering without instructions",
        ),
        by_layer=report(
            "reports/figures/text_steering/kind_shift_by_layer.png",
            caption="../reports/captions/text_steering_by_layer.rst",
            labels=measured_label("text_steering"),
            category="Steering without instructions",
        ),
        summary=report(
            "reports/tables/text_steering/summary.csv",
            caption="../reports/captions/text_steering_summary.rst",
            category="Steering without instructions",
        ),
        shifts="reports/tables/text_steering/kind_shift.csv",
    log:
        "logs/plot_text_steering/plot_text_steering.log",
    benchmark:
        "logs/plot_text_steering/plot_text_steering.benchmark.tsv"
    conda:
        "../envs/workflow.yaml"
    params:
        kinds=[kind["name"] for kind in config["text_steering"]["kinds"]],
    script:
        "../workflow_scripts/rule_plot_text_steering.py"
