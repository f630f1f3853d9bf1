# Activation extraction: model x prompt set -> Parquet of the residual stream after every block.


rule extract_activations:
    input:
        manifest="data/models/{model}/manifest.json",
        prompts=prompt_set_path,
    output:
        parquet="data/activations/{model}/{prompt_set}.parquet",
    params:
        spec=model_spec,
        template=prompt_set_template,
        extraction=config["extraction"],
    log:
        "logs/extract_activations/{model}/{prompt_set}.log",
    benchmark:
        "logs/extract_activations/{model}/{prompt_set}.benchmark.tsv"
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        "../envs/workflow.yaml"
    script:
        "../workflow_scripts/rule_extract_activations.py"
