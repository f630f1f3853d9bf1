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


# The hybrid families: a block's kind from its config (the ports' own rules and defaults), True where
# the block keeps a fixed-size recurrent state (the others are attention blocks with a key/value cache).
_RECURRENT_BLOCK = {
    "jamba": lambda config, i: i % config.get("attn_layer_period", 8) != config.get("attn_layer_offset", 4),
    "lfm2": lambda config, i: (
        config["layer_types"][i] == "conv" if "layer_types" in config else i not in config.get("full_attn_idxs", [])
    ),
    "recurrent_gemma": lambda config, i: (
        list(config.get("block_types", ("recurrent", "recurrent", "attention"))) * (i + 1)
    )[i] == "recurrent",
}  # fmt: skip


def stateless_layers(spec: dict, n_layers: int) -> list[int] | None:
    """The blocks of a hybrid model without a recurrent state (its attention blocks), read from the
    config of a model built here; [] for a family whose every block (or none) has a state; None where
    only the loaded model can tell (a hybrid from the hub: the sweep itself refuses such layers)."""
    rule = _RECURRENT_BLOCK.get(spec["family"])
    if rule is None:
        return []
    built_here = spec["source"].get("tiny") or spec["source"].get("trained")
    if not built_here:
        return None
    config = built_here.get("config", {})
    return [layer for layer in range(n_layers) if not rule(config, layer)]
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
