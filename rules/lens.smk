# Tuned lens vs logit lens: corpus -> translators -> per-layer evaluation.


rule prepare_corpus:
    input:
        manifest=model_manifest("{model}"),
    output:
        corpus="data/lens/{model}/corpus.npz",
    log:
        "logs/prepare_corpus/{model}.log",
    benchmark:
        "logs/prepare_corpus/{model}.benchmark.tsv"
    conda:
        "../envs/workflow.yaml"
    params:
        spec=model_spec,
        corpus=config["lens"]["corpus"],
        seed=config["seed"],
    script:
        "../workflow_scripts/rule_prepare_corpus.py"


rule train_tuned_lens:
    input:
        manifest=model_manifest("{model}"),
        corpus="data/lens/{model}/corpus.npz",
    output:
        weights="data/lens/{model}/lens.safetensors",
        settings="data/lens/{model}/lens.json",
        package=directory("data/lens/{model}/tuned-lens"),
    log:
        "logs/train_tuned_lens/{model}.log",
    benchmark:
        "logs/train_tuned_lens/{model}.benchmark.tsv"
    conda:
        "../envs/workflow.yaml"
    resources:
        mem_mb=job_memory("train_tuned_lens"),
        runtime=job_minutes("train_tuned_lens"),
    params:
        spec=model_spec,
        training=config["lens"]["training"],
        seed=config["seed"],
    script:
        "../workflow_scripts/rule_train_tuned_lens.py"


rule evaluate_lens:
    input:
        manifest=model_manifest("{model}"),
        corpus="data/lens/{model}/corpus.npz",
        weights="data/lens/{model}/lens.safetensors",
    output:
        evaluation="data/lens/{model}/evaluation.csv",
        trajectory="data/lens/{model}/trajectory.parquet",
    log:
        "logs/evaluate_lens/{model}.log",
    benchmark:
        "logs/evaluate_lens/{model}.benchmark.tsv"
    conda:
        "../envs/workflow.yaml"
    resources:
        mem_mb=job_memory("evaluate_lens"),
        runtime=job_minutes("evaluate_lens"),
    params:
        spec=model_spec,
        batch_size=config["lens"]["eval_batch_size"],
        sample_text=config["lens"]["sample_text"],
    script:
        "../workflow_scripts/rule_evaluate_lens.py"
