"""Rule extract_sae_activations: the shared token windows through one model -> Parquet of the residual
stream after the SAE layers at every position."""

from workflow_scripts.activations import extract_activations
from workflow_scripts.adapters import load_job_adapter
from workflow_scripts.jobs import start_job
from workflow_scripts.sae import token_windows

sm = snakemake  # noqa: F821 - injected by Snakemake
log = start_job(sm)
windows = sm.params.windows
items, token_lists = token_windows(sm.input.tokens, windows["train_windows"], windows["eval_windows"], windows["seed"])
adapter = load_job_adapter(sm.params.spec, sm.wildcards.model, sm.input.manifest)
log.info("%d windows, %d tokens, model %s", len(items), sum(map(len, token_lists)), sm.wildcards.model)
extract_activations(
    adapter,
    items,
    token_lists,
    sm.output.parquet,
    batch_size=sm.params.batch_size,
    positions="all",
    layers=sm.params.layers,
    storage_dtype="float32",
    rows_per_row_group=4096,
    metadata={"prompt_set": "sae-token-windows", "template": "tokens", "tokens": str(sm.input.tokens), **windows},
)
