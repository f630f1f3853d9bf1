"""Rule extract_activations: one model x one prompt set -> Parquet of residual-stream activations."""


from workflow_scripts.activations import extract_activations
from workflow_scripts.adapters import load_job_adapter
from workflow_scripts.jobs import start_job
from workflow_scripts.prompts import load_prompt_set, tokenize_prompts

sm = snakemake  # noqa: F821 - injected by Snakemake
log = start_job(sm)
settings = sm.params.extraction
items = load_prompt_set(sm.input.prompts)
adapter = load_job_adapter(sm.params.spec, sm.wildcards.model, sm.input.manifest)
token_lists = tokenize_prompts(adapter, items, sm.params.template)
log.info("%d prompts, %d tokens, model %s", len(items), sum(map(len, token_lists)), sm.wildcards.model)
extract_activations(
    adapter,
    items,
    token_lists,
    sm.output.parquet,
    batch_size=settings["batch_size"],
    positions=settings["positions"],
    layers=settings["layers"],
    storage_dtype=settings["storage_dtype"],
    rows_per_row_group=settings["rows_per_row_group"],
    metadata={"prompt_set": sm.wildcards.prompt_set, "template": sm.params.template},
)
