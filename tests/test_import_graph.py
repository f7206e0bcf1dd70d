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


# The layers of docs/architecture.md, lowest first: a module may import its own layer and the layers below, never
# one above. Prefixes match a module and its submodules; every tav module must fall in exactly one layer.
LAYERS = (
    ("foundations", ("tav.backend", "tav.checks", "tav.cli", "tav.noise", "tav.checkpoint", "tav.windows",
                     "tav.world")),
    ("kernels and portable layers", ("tav.kernels", "tav.nn")),
    ("models and their parts", ("tav.models", "tav.schedulers", "tav.text", "tav.video", "tav.config",
                                "tav.ldm_checkpoint", "tav.lora", "tav.clip", "tav.memory_plan", "tav.tiny")),
    ("inversion and sampling", ("tav.inversion", "tav.sampling")),
    ("the delta format", ("tav.delta",)),
    ("the pipeline and scoring", ("tav.pipeline", "tav.evaluation")),
    ("training and the sampling job", ("tav.optim", "tav.train_step", "tav.train_state", "tav.loss_plot", "tav.lora_tuning",
                                       "tav.training", "tav.generate")),
    ("jobs built on both", ("tav.demo", "tav.loveu", "tav.world_demo", "tav.world_training", "tav.world_model",
                            "tav.app", "tav.app_ui")),
)


def layer_of(module):
    matches = [index for index, (_, prefixes) in enumerate(LAYERS)
               for prefix in prefixes if module == prefix or module.startswith(prefix + ".")]
    assert len(matches) == 1, f"{module} is in {len(matches)} layers of LAYERS; place it in exactly one"
    return matches[0]


def test_every_module_has_a_layer():
    for module in import_graph():
        if module != "tav":
            layer_of(module)


def test_imports_point_down_the_layers():
    upward = [f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
              for module, targets in import_graph().items() if module != "tav"
              for target in sorted(targets) if target != "tav" and layer_of(target) > layer_of(module)]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_an_upward_import_would_be_found():
    assert layer_of("tav.pipeline") > layer_of("tav.delta") > layer_of("tav.sampling") > layer_of("tav.models.vae")
    assert layer_of("tav.training") > layer_of("tav.pipeline")
