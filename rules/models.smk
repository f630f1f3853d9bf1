# Model materialisation: build tiny models, fetch pinned hub snapshots, checksum packaged files.


rule build_model:
    wildcard_constraints:
        model=BUILT_MODELS,
    output:
        manifest=model_manifest("{model}"),
    params:
        spec=model_spec,
    log:
        "logs/build_model/{model}.log",
    benchmark:
        "logs/build_model/{model}.benchmark.tsv"
    resources:
        mem_mb=job_memory("build_model"),
        runtime=job_minutes("build_model"),
    conda:
        "../envs/workflow.yaml"
    script:
        "../workflow_scripts/rule_build_model.py"
