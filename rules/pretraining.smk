# Language models the pipeline trains itself: a shared tokenizer and token chunks, then each model.


rule prepare_tokenizer:
    output:
        tokenizer=directory("data/tokenizers/{tokenizer}/tokenizer"),
        tokens="data/tokenizers/{tokenizer}/tokens.npz",
        stats="data/tokenizers/{tokenizer}/stats.json",
    log:
        "logs/prepare_tokenizer/{tokenizer}.log",
    benchmark:
        "logs/prepare_tokenizer/{tokenizer}.benchmark.tsv"
    conda:
        "../envs/workflow.yaml"
    params:
        settings=tokenizer_settings,
    script:
        "../workflow_scripts/rule_prepare_tokenizer.py"


rule train_model:
    input:
        tokenizer=trained_model_tokenizer("tokenizer"),
        tokens=trained_model_tokenizer("tokens"),
        stats=trained_model_tokenizer("stats"),
    output:
        # A trained model is a model like any other: later rules find it by its manifest.
        manifest=protected(model_manifest("{model}")),
        history="data/models/{model}/training.csv",
    log:
        "logs/train_model/{model}.log",
    benchmark:
        "logs/train_model/{model}.benchmark.tsv"
    wildcard_constraints:
        model=TRAINED_MODELS,
    conda:
        "../envs/workflow.yaml"
    resources:
        mem_mb=job_memory("train_model"),
        runtime=job_minutes("train_model"),
    params:
        spec=model_spec,
    script:
        "../workflow_scripts/rule_train_model.py"
