"""One-way layers: every import of the package (top-level and inside functions) goes down the layer order below,
none goes round in a circle, and no module imports another's private name. Read from the source with ``ast``."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "explorer"

# bottom up; a module may import from its own layer and the layers below it, never from above
LAYERS = [
    ("foundations", ["errors", "assets", "hubcache", "devices", "processes", "outputs", "layout", "weightformats",
                     "shards", "packing", "taskfiles", "perlayer"]),
    ("expert kernels (typed against the ExpertLayer protocol)", ["kernels"]),
    ("the view's self-check", ["selfcheck"]),
    ("the MoE view", ["moe"]),
    ("neuron helpers, model surgery, what engines read, error-compensating edits",
     ["neurons", "surgery", "engines", "compensate"]),
    ("reading models and text, a model sharded over processes", ["layerwise", "loading", "data", "sharding"]),
    ("passes over the model", ["perplexity", "stats", "hessians"]),
    ("the operation base", ["ops.base"]),
    ("what each operation does", ["ops.drop_experts", "ops.merge", "ops.slim", "ops.prune", "ops.drop_layers",
                                  "ops.drop_blocks", "ops.quantise"]),
    ("the registry", ["ops"]),
    ("the plan", ["plan"]),
    ("what a plan does to a layer", ["transform"]),
    ("preview, apply, out-of-core apply", ["preview", "apply", "checkpoint"]),
    ("scores", ["saliency", "tasks", "report"]),
    ("how each operation is chosen", ["planners.base", "planners.drop_experts", "planners.merge", "planners.slim",
                                      "planners.prune", "planners.drop_layers", "planners.drop_blocks",
                                      "planners.quantise", "planners"]),
    ("distillation and tools", ["distill", "tiny", "families", "sweep", "speed", "mtp"]),
    ("figures and session", ["figures", "why", "session.common", "session.access", "session.editor", "session.trials",
                             "session.workspace", "session.files", "session"]),
    ("front ends", ["cli", "widgets", "", "__main__"]),
]
LEVEL = {name: i for i, (_, names) in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _imports(name: str, path: Path, modules: dict) -> list[tuple[str, str, int]]:
    """(imported module, imported name, line) for every import of a package module in ``path``."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".") if pkg else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "explorer":
                target = node.module[len("explorer"):].lstrip(".")
            else:
                continue
            for a in node.names:
                sub = f"{target}.{a.name}".lstrip(".")
                found.append((sub if sub in modules else target, a.name, node.lineno))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "explorer":
                    found.append((a.name[len("explorer"):].lstrip("."), "", node.lineno))
    return [(t, n, line) for t, n, line in found if t in modules and t != name]


def _graph():
    modules = _modules()
    return modules, {m: _imports(m, p, modules) for m, p in modules.items()}


def test_every_module_has_a_layer():
    modules, _ = _graph()
    missing = sorted(set(modules) - set(LEVEL))
    assert not missing, f"modules with no place in LAYERS (tests/test_layers.py): {missing}"


def test_imports_go_down_the_layers_only():
    _, graph = _graph()
    up = [f"explorer.{m or '__init__'}:{line} imports {t} ({LAYERS[LEVEL[t]][0]}), above its layer "
          f"({LAYERS[LEVEL[m]][0]})" for m, imps in graph.items() for t, _, line in imps
          if m in LEVEL and t in LEVEL and LEVEL[t] > LEVEL[m]]
    assert not up, "\n".join(up)


def test_no_import_circles():
    _, graph = _graph()
    edges = {m: {t for t, _, _ in imps} for m, imps in graph.items()}
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_no_module_imports_another_modules_private_name():
    _, graph = _graph()
    private = [f"explorer.{m}:{line} imports {n} from {t}" for m, imps in graph.items() for t, n, line in imps
               if n.startswith("_") and not n.startswith("__")]
    for line_no, line in enumerate((ROOT / "app.py").read_text().splitlines(), 1):
        if line.lstrip().startswith("from explorer") and " import _" in line:
            private.append(f"app.py:{line_no}: {line.strip()}")
    assert not private, "\n".join(private)


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The rules above can fail: a module of the foundations that imports the plan is caught twice."""
    fake = {"errors": tmp_path / "errors.py", "plan": tmp_path / "plan.py"}
    fake["errors"].write_text("def f():\n    from .plan import Plan, _hidden\n")
    fake["plan"].write_text("from .errors import PlanError\n")
    imps = _imports("errors", fake["errors"], fake)
    assert ("plan", "Plan", 2) in imps and ("plan", "_hidden", 2) in imps
    assert LEVEL["plan"] > LEVEL["errors"]  # so test_imports_go_down_the_layers_only would name it
