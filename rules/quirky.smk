# Quirky models: arithmetic data -> fine-tuned model "<base>+<dataset>" -> activations -> probes.


rule prepare_quirky:
    input:
        unpack(quirky_source_files),
    output:
        table="data/quirky/{dataset}/table.parquet",
        statements="data/quirky/{dataset}/statements.jsonl",
        pairs="data/quirky/{dataset}/pairs.jsonl",
        shortcuts=report(
            "data/quirky/{dataset}/shortcuts.csv",
            caption="../reports/captions/table_quirky_shortcuts.rst",
            category="Quirky models",
            subcategory="{dataset}",
        ),
    log:
        "logs/prepare_quirky/{dataset}.log",
    benchmark:
        "logs/prepare_quirky/{dataset}.benchmark.tsv"
    conda:
        "../envs/workflow.yaml"
    params:
        settings=quirky_dataset_settings,
        seed=config["seed"],
    script:
        "../workflow_scripts/rule_prepare_quirky.py"


rule finetune_quirky:
    input:
        base_manifest=model_manifest("{base}"),
        table="data/quirky/{dataset}/table.parquet",
    output:
        # The fine-tuned model is a model like any other: later rules find it by its manifest.
        manifest=protected(model_manifest(finetuned_name("{base}", "{dataset}"))),
    log:
        "logs/finetune_quirky/{base}+{dataset}.log",
    benchmark:
        "logs/finetune_quirky/{base}+{dataset}.benchmark.tsv"
    conda:
        "../envs/workflow.yaml"
    resources:
        mem_mb=job_memory("finetune_quirky"),
        runtime=job_minutes("finetune_quirky"),
    params:
        base_spec=base_model_spec,
        spec=model_spec,
        finetune=config["quirky"]["finetune"],
        seed=config["seed"],
    script:
        "../workflow_scripts/rule_finetune_quirky.py"


rule answer_quirky:
    input:
        manifest=model_manifest(finetuned_name("{base}", "{dataset}")),
        table="data/quirky/{dataset}/table.parquet",
    output:
        answers="data/quirky/answers/{base}/{dataset}/answers.parquet",
        accuracy=report(
            "data/quirky/answers/{base}/{dataset}/accuracy.csv",
            caption="../reports/captions/table_quirky_accuracy.rst",
            category="Quirky models",
            subcategory="{base} / {dataset}",
        ),
    log:
        "logs/answer_quirky/{base}/{dataset}.log",
    benchmark:
        "logs/answer_quirky/{base}/{dataset}.benchmark.tsv"
    conda:
        "../envs/workflow.yaml"
    resources:
        mem_mb=job_memory("answer_quirky"),
        runtime=job_minutes("answer_quirky"),
    params:
        spec=model_spec,
    script:
        "../workflow_scripts/rule_answer_quirky.py"


rule fit_probes:
    input:
        table="data/quirky/{dataset}/table.parquet",
        statements=activation_file(finetuned_name("{base}", "{dataset}"), "quirky-{dataset}"),
        pairs=activation_file(finetuned_name("{base}", "{dataset}"), "quirky-{dataset}-pairs"),
    output:
        auroc=report(
            "data/quirky/probes/{base}/{dataset}/auroc.csv",
            caption="../reports/captions/table_quirky_probes.rst",
            category="Quirky models",
            subcategory="{base} / {dataset}",
        ),
        anomaly=report(
            "data/quirky/probes/{base}/{dataset}/anomaly.csv",
            caption="../reports/captions/table_quirky_anomaly.rst",
            category="Quirky models",
            subcategory="{base} / {dataset}",
        ),
    log:
        "logs/fit_probes/{base}/{dataset}.log",
    benchmark:
        "logs/fit_probes/{base}/{dataset}.benchmark.tsv"
    conda:
        "../envs/workflow.yaml"
    resources:
        mem_mb=job_memory("fit_probes"),
        runtime=job_minutes("fit_probes"),
    params:
        probes=config["quirky"]["probes"],
        seed=config["seed"],
    script:
        "../workflow_scripts/rule_fit_probes.py"
