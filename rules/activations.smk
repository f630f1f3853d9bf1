# Activation extraction: model x prompt set -> Parquet of the residual stream after every block.


rule extract_activations:
    input:
        manifest=model_manifest("{model}"),
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
        mem_mb=job_memory("extract_activations"),
        runtime=job_minutes("extract_activations"),
    conda:
        "../envs/workflow.yaml"
    script:
        "../workflow_scripts/rule_extract_activations.py"
