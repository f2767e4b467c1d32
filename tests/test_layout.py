"""The layout the README states: imports run one way, scripts are leaves, the library parses no flags, and no
function is longer than 60 lines."""
import ast

from conftest import ROOT

SCRIPTS = {"example2", "main", "test_amplification", "synergy", "theory", "train", "bench", "pretrained"}
# The one exception: the evaluation scripts train missing cells through train.py, and bench.py times its steps.
MAY_IMPORT_TRAIN = {"main", "test_amplification", "synergy", "theory", "bench"}
LAYERS = [  # a module imports only modules of lower layers (and of its own layer where listed together)
    {"example2", "main", "test_amplification", "synergy", "theory", "bench", "pretrained"},
    {"train", "lm_costs"},
    {"amplification", "learners", "lm_analysis", "lm_figures", "lm_gradient", "lm_quantisation"},
    {"evaluation", "runs", "claims"},
    {"checkpoints", "graphs", "hf_models"},
    {"transformer"},
    {"walks"},
    {"cpu_attention", "proxies", "sequence_datasets", "script_io"},
    {"official"},
    {"config"},
]


def repo_imports():
    """{module: set of this repo's modules it imports}, for every top-level .py file."""
    modules = {path.stem: path for path in ROOT.glob("*.py")}
    imports = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        found = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
        found |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                  and node.module}
        imports[name] = found & set(modules)
    return imports


def test_every_module_has_a_layer():
    assert set(repo_imports()) == set().union(*LAYERS)


def test_scripts_are_leaves():
    for module, imported in repo_imports().items():
        scripts = imported & SCRIPTS
        assert scripts <= ({"train"} if module in MAY_IMPORT_TRAIN else set()), (module, scripts)


def test_imports_run_one_way():
    layer_of = {module: i for i, layer in enumerate(LAYERS) for module in layer}
    for module, imported in repo_imports().items():
        for other in imported:
            if layer_of[module] == layer_of[other]:  # within a layer, only runs reads claims
                assert (module, other) == ("runs", "claims"), (module, other)
            else:
                assert layer_of[other] > layer_of[module], (module, other)


def test_library_modules_parse_no_flags_and_functions_are_short():
    for path in ROOT.glob("*.py"):
        tree = ast.parse(path.read_text())
        if path.stem not in SCRIPTS and path.stem != "script_io":
            assert "argparse" not in repo_imports()[path.stem] and "import argparse" not in path.read_text(), path
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno < 60, f"{path.name}: {node.name}"
