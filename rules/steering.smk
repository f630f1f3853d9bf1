# Steering: behaviour data -> contrast activations -> steering vectors -> multiplier sweep.


rule prepare_behaviors:
    input:
        unpack(behavior_source_files),
    output:
        behavior_items="data/behaviors/{behavior}/items.json",
        prompts="data/behaviors/{behavior}/contrast.jsonl",
    log:
        "logs/prepare_behaviors/{behavior}.log",
    benchmark:
        "logs/prepare_behaviors/{behavior}.benchmark.tsv"
    conda:
        "../envs/workflow.yaml"
    params:
        source=behavior_source,
        settings=behavior_settings,
        seed=config["seed"],
    script:
        "../workflow_scripts/rule_prepare_behaviors.py"


rule compute_steering_vectors:
    input:
        activations=activation_file("{model}", "behavior-{behavior}"),
        behavior_items="data/behaviors/{behavior}/items.json",
        manifest=model_manifest("{model}"),
    output:
        vectors="data/steering/{model}/{behavior}/vectors.safetensors",
    log:
        "logs/compute_steering_vectors/{model}/{behavior}.log",
    benchmark:
        "logs/compute_steering_vectors/{model}/{behavior}.benchmark.tsv"
    conda:
        "../envs/workflow.yaml"
    resources:
        mem_mb=job_memory("compute_steering_vectors"),
        runtime=job_minutes("compute_steering_vectors"),
    params:
        spec=model_spec,
        batch_size=config["extraction"]["batch_size"],
        state=steers_state,
    script:
        "../workflow_scripts/rule_compute_steering_vectors.py"


rule evaluate_steering:
    input:
        vectors="data/steering/{model}/{behavior}/vectors.safetensors",
        behavior_items="data/behaviors/{behavior}/items.json",
        manifest=model_manifest("{model}"),
    output:
        sweep="data/steering/{model}/{behavior}/sweep.parquet",
    log:
        "logs/evaluate_steering/{model}/{behavior}.log",
    benchmark:
        "logs/evaluate_steering/{model}/{behavior}.benchmark.tsv"
    conda:
        "../envs/workflow.yaml"
    resources:
        mem_mb=job_memory("evaluate_steering"),
        runtime=job_minutes("evaluate_steering"),
    params:
        spec=model_spec,
        settings=steering_sweep_settings,
    script:
        "../workflow_scripts/rule_evaluate_steering.py"
