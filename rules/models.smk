# Model materialisation: build tiny models, fetch pinned hub snapshots, checksum packaged files.


rule build_model:
    output:
        manifest=model_manifest("{model}"),
    log:
        "logs/build_model/{model}.log",
    benchmark:
        "logs/build_model/{model}.benchmark.tsv"
    wildcard_constraints:
        model=BUILT_MODELS,
    conda:
        "../envs/workflow.yaml"
    resources:
        mem_mb=job_memory("build_model"),
        runtime=job_minutes("build_model"),
    params:
        spec=model_spec,
    script:
        "../workflow_scripts/rule_build_model.py"
