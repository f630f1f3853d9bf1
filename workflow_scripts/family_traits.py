"""What a family's adapter (workflow_scripts/adapters.py) can do with a model, judged from its config
entry alone. Part of the adapter layer, kept apart so that the config check, which runs before any
job, does not import torch."""

from __future__ import annotations


def unreadable_state(spec: dict) -> str | None:
    """Why the adapter cannot read the recurrent state of the model `spec` describes, or None where it
    can. None too for families without such a state: their state modes are skipped, not refused."""
    if spec["family"] != "rwkv":
        return None
    # The RwkvAdapter reads the state of transformers' own RWKV port, which is RWKV-4. RWKV-5, 6
    # and 7 checkpoints run their own modelling code (trust_remote_code), with another state layout.
    tiny = spec["source"].get("tiny")
    if spec.get("trust_remote_code"):
        return (
            "it is loaded with its own modelling code (trust_remote_code: RWKV-5, 6 or 7), whose state the "
            "rwkv adapter cannot read (only RWKV-4, transformers' port; family rwkv-pkg reads RWKV-5, 6 and 7)"
        )
    if tiny is not None and tiny["model_type"] != "rwkv":
        return f"its model_type {tiny['model_type']!r} is not RWKV-4 ('rwkv'), the only RWKV state the adapter reads"
    return None


# The family whose models the `rwkv` package runs (RWKV-5, 6 and 7; workflow_scripts/rwkv_package.py).
RWKV_PACKAGE = "rwkv-pkg"


def unloadable(spec: dict) -> str | None:
    """Why the model `spec` describes cannot be loaded by its family's adapter, or None."""
    if spec["family"] != RWKV_PACKAGE:
        return None
    (kind,) = spec["source"]
    if kind not in ("local", "hub"):
        return f"family {RWKV_PACKAGE} loads source local or hub (a .pth or a Hugging Face RWKV-5 folder), not {kind!r}"
    if spec.get("format", "transformers") != "transformers":
        return f"format {spec['format']!r} does not apply to family {RWKV_PACKAGE} (the layout is read from the keys)"
    return None


def fine_tunable(spec: dict) -> bool:
    """Whether the fine-tuning stage (quirky models) can train the model: not the rwkv package's
    models, which it only runs forward."""
    return spec["family"] != RWKV_PACKAGE
