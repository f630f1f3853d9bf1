"""The code's rooms: data flows rule script -> stage -> shared pieces (data formats, scoring) -> adapters
-> model sources, and no stage imports another stage, so a stage can change without touching the others."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "workflow_scripts"

# Every module of workflow_scripts is in exactly one layer; a new module must be placed here.
LAYERS = {
    "infrastructure": {"__init__", "atomic", "jobs", "configuration", "prefetch", "schedules"},
    "adapters": {"adapters", "model_sources", "family_traits", "rwkv_package", "fast_scans"},
    # data formats and the pieces stages share
    "shared": {"activations", "behavior_data", "quirky_data", "quirky_answers", "prompts", "corpus", "plotting"},
    "stages": {
        "steering", "text_steering", "lens", "finetune", "probes", "figures", "sae_figures", "pretraining", "sae",
        "feature_similarity", "results_page",
    },
}
# What each layer may import from the package: no stage imports a stage, no rule script a rule script.
ALLOWED = {
    "infrastructure": {"infrastructure", "adapters"},
    "adapters": {"infrastructure", "adapters"},
    "shared": {"infrastructure", "adapters", "shared"},
    "stages": {"infrastructure", "adapters", "shared"},
    "rule scripts": {"infrastructure", "adapters", "shared", "stages"},
}


def layer_of(module: str) -> str:
    if module.startswith("rule_"):
        return "rule scripts"
    found = [name for name, members in LAYERS.items() if module in members]
    assert found, f"workflow_scripts/{module}.py is in no layer of tests/test_module_layers.py: place it"
    return found[0]


def package_imports(path: Path) -> set[str]:
    """workflow_scripts modules imported anywhere in the file (function-level imports included)."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("workflow_scripts"):
            parts = node.module.split(".")
            if len(parts) > 1:
                imported.add(parts[1])
            else:  # from workflow_scripts import x
                imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            imported.update(a.name.split(".")[1] for a in node.names if a.name.startswith("workflow_scripts."))
    return imported


MODULES = sorted(path for path in PACKAGE.glob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[path.stem for path in MODULES])
def test_module_imports_only_what_its_layer_allows(path):
    layer = layer_of(path.stem)
    for imported in package_imports(path) - {path.stem, "CODE_VERSION"}:
        target = layer_of(imported)
        assert target in ALLOWED[layer], (
            f"{path.stem} ({layer}) imports {imported} ({target}): move the shared code down a layer"
        )

def test_the_layer_check_catches_a_stage_importing_a_stage(tmp_path):
    """The parser sees top-level and function-level imports alike."""
    module = tmp_path / "steering.py"
    module.write_text("def f():\n    from workflow_scripts.lens import train_lens\n")
    assert package_imports(module) == {"lens"}
    assert layer_of("lens") == "stages"
