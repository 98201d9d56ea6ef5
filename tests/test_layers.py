"""The package is a ladder (see surgery/__init__.py): each layer imports only from itself and the layers below it,
at module level and inside functions alike, with no cycle between modules; and imports inside functions are kept
for what buys start-up time (heavy third-party modules, and `cli/` reaching down into the pipelines)."""

import ast
from collections import defaultdict
from pathlib import Path

import pytest

import surgery

PACKAGE = Path(surgery.__file__).parent
HEAVY = {"torch", "transformers", "triton", "safetensors", "huggingface_hub", "accelerate", "peft", "datasets",
         "pyarrow", "lm_eval", "matplotlib", "gguf", "numpy", "scipy", "yaml", "tqdm", "optimum", "fcntl",
         "importlib", "hypothesis", "resource", "tokenizers", "pydoc_data"}  # pydoc_data: 0.7 MB of text


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if module == "surgery.__main__":
        return "cli"  # `python -m surgery` is the CLI
    return parts[1] if len(parts) > 1 and parts[1] in surgery.LADDER else "<root>"


def rank(module: str) -> int:
    layer = layer_of(module)
    return -1 if layer == "<root>" else surgery.LADDER.index(layer)


def resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports() -> list[tuple[str, str, bool, int]]:
    """(importer, imported module, inside a function, line) for every import in the package, `lazy_import(...)`
    included."""
    modules = {module_name(path) for path in PACKAGE.rglob("*.py")}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        tree = ast.parse(path.read_text(), filename=str(path))
        in_function = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                in_function.update(id(child) for child in ast.walk(node) if child is not node)
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = resolve(node, module, path.name == "__init__.py")
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy_import" and node.args
                  and isinstance(node.args[0], ast.Constant)):  # a lazy module is an import all the same
                targets = [node.args[0].value]
            for target in targets:
                found.append((module, target, id(node) in in_function, node.lineno))
    return found


def shipped(module: str) -> bool:
    return layer_of(module) in ("arch", "kernels")


def test_ladder_is_declared_once():
    assert surgery.LADDER[:3] == ("base", "kernels", "arch")
    folders = {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").is_file()}
    assert folders == set(surgery.LADDER), folders ^ set(surgery.LADDER)


def test_no_import_goes_up_the_ladder():
    upward = [f"{importer}:{line} imports {target}" for importer, target, _, line in imports()
              if target.startswith("surgery") and rank(target) > rank(importer)
              and not (shipped(importer) and shipped(target))]  # arch's kernels fallback is one shipped folder
    assert not upward, "\n".join(upward)


def test_no_cycle_between_modules():
    graph = defaultdict(set)
    for importer, target, _, _ in imports():
        if target.startswith("surgery.") and target != importer:
            graph[importer].add(target)
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_function_level_imports_only_buy_start_up_time():
    allowed_third_party = [f"{i}:{line} imports {t}" for i, t, inside, line in imports()
                           if inside and not t.startswith("surgery") and t.split(".")[0] not in HEAVY]
    own = [f"{i}:{line} imports {t}" for i, t, inside, line in imports()
           if inside and t.startswith("surgery") and layer_of(i) != "cli"
           and not shipped(i)]
    assert not own, "\n".join(own)
    assert not allowed_third_party, "\n".join(allowed_third_party)


@pytest.mark.parametrize("bad", ["surgery.cli.main", "surgery.pipelines.convert"])
def test_the_checker_sees_an_upward_import(bad):
    """The checks above would catch a recipe that imported the CLI or the convert pipeline."""
    assert rank(bad) > rank("surgery.recipes.kvsharer")
