# Activation extraction: model x prompt set -> Parquet of the residual stream after every block.


rule extract_activations:
    input:
        manifest=model_manifest("{model}"),
        prompts=prompt_set_path,
    output:
        parquet=activation_file("{model}", "{prompt_set}"),
    log:
        "logs/extract_activations/{model}/{prompt_set}.log",
    benchmark:
        "logs/extract_activations/{model}/{prompt_set}.benchmark.tsv"
    conda:
        "../envs/workflow.yaml"
    resources:
        mem_mb=job_memory("extract_activations"),
        runtime=job_minutes("extract_activations"),
    params:
        spec=model_spec,
        template=prompt_set_template,
        extraction=config["extraction"],
    script:
        "../workflow_scripts/rule_extract_activations.py"
