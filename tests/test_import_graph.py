"""The import graph of tav's modules (kernels included), read from the source with ast: no cycles, tav.backend a
leaf, and inference (tav.pipeline) independent of training. Every import counts, also those inside functions."""
import ast
import pathlib

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parent.parent / "tav"


def module_files():
    """{'tav.models.unet3d': path, 'tav.kernels': path of its __init__.py, ...}"""
    modules = {}
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _package_of(module, path):
    return module if path.name == "__init__.py" else module.rsplit(".", 1)[0]


def import_graph():
    """{module: set of tav modules it imports}: `from a import b` imports a.b when that is a module, else a."""
    modules = module_files()
    graph = {}
    for module, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = _package_of(module, path).split(".")
                    package = package[: len(package) - (node.level - 1)]
                    base = ".".join(package + ([base] if base else []))
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            else:
                continue
            targets.update(name for name in names if name in modules and name != module)
        graph[module] = targets
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules, or None (depth-first search)."""
    state = {}
    stack = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_the_kernels_and_their_imports():
    graph = import_graph()
    assert "tav.kernels.attention_backends.dispatch" in graph and "tav.kernels.cpu.build" in graph
    assert "tav.kernels.cpu.aot" in graph["tav.kernels.cpu.conv"]  # a relative import, resolved
    assert "tav.backend" in graph["tav.kernels.cpu"]


def test_a_cycle_is_found_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_tav_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_backend_is_a_leaf():
    assert import_graph()["tav.backend"] == set()


def test_the_pipeline_does_not_import_training():
    graph = import_graph()
    reachable, todo = set(), ["tav.pipeline"]
    while todo:
        for target in graph[todo.pop()] - reachable:
            reachable.add(target)
            todo.append(target)
    assert not {name for name in reachable if name.startswith(("tav.training", "tav.train_"))}
