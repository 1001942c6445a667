"""The shape of the code: dependencies point one way (docs/design.md §7).

Reads the imports of every module of the project (at any depth: a function-level import
counts) and checks the layering:

    utils/  <  prerequisites/  <  dataset/ efficiency/ evaluate/ prune/ quantize/
            <  pipelines/  <  entry scripts (prune_bert.py, ...), scripts/, benchmarks/
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {".venv", ".git", "tests", "models", "output", "logs", "data", "__pycache__"}
ENTRY_SCRIPTS = {"prune_bert", "prune_opt", "quantize_opt", "opt_eval", "sweep", "report"}
MODEL_FAMILY = ("prerequisites.adapters", "prerequisites.modeling_stat", "transformers")


def project_modules(root):
    """{dotted module name: file path} of every .py file of the project."""
    modules = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), root)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                if rel:
                    modules[".".join(rel)] = os.path.join(folder, name)
    return modules


def imports_of(path, modules):
    """The modules a file imports: project modules by their dotted name, others by their top name."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    tops = {name.split(".")[0] for name in modules}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from a import b` imports module a.b when there is one, else a name of a
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        else:
            continue
        found.update(_owner(name, modules) if name.split(".")[0] in tops else name for name in names)
    return found


def _owner(name, modules):
    """The longest project module that `name` is or lies in."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return name


def graph(root):
    modules = project_modules(root)
    return {name: imports_of(path, modules) for name, path in modules.items()}


def violations(edges):
    """Every broken rule, as readable lines."""
    found = []

    def within(module, package):
        return module == package or module.startswith(package + ".")

    for module, imported in sorted(edges.items()):
        for target in sorted(imported):
            if within(module, "prune") and (any(within(target, f) for f in MODEL_FAMILY)
                                            or within(target, "dataset") or within(target, "efficiency")):
                found.append(f"prune/ imports {target}: {module}")
            if any(within(module, p) for p in ("dataset", "evaluate", "efficiency", "quantize")) \
                    and within(target, "prune"):
                found.append(f"{module} imports prune/ ({target})")
            if target in ENTRY_SCRIPTS and target != module:
                found.append(f"{module} imports the entry script {target}")
            if within(module, "utils") and target in edges and not within(target, "utils"):
                found.append(f"utils/ is not a leaf: {module} imports {target}")
            if module == "prerequisites.modeling_stat" and target.split(".")[0] not in ("torch", "transformers",
                                                                                       "warnings"):
                found.append(f"modeling_stat.py must stand alone, imports {target}")
    found += [f"import circle: {' -> '.join(cycle)}" for cycle in cycles(edges)]
    return found


def cycles(edges):
    """One cycle per strongly connected component of more than one module (or a self-import)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                found.append(sorted(component) + [sorted(component)[0]])

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def code_without_docstrings(path):
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)  # comments are gone too


def test_dependencies_point_one_way():
    problems = violations(graph(ROOT))
    assert not problems, "\n".join(problems)


def test_the_check_finds_what_it_looks_for(tmp_path):
    files = {
        "utils/__init__.py": "", "utils/cli.py": "import dataset.lm\n",
        "dataset/__init__.py": "", "dataset/lm.py": "def f():\n    from prune.stat import x\n",
        "prune/__init__.py": "", "prune/stat.py": "from efficiency import macs\nimport dataset.lm\n",
        "efficiency/__init__.py": "", "efficiency/macs.py": "",
        "prune_opt.py": "", "opt_eval.py": "import prune_opt\n",
        "pipelines/__init__.py": "", "pipelines/a.py": "import pipelines.b\n", "pipelines/b.py": "import pipelines.a\n",
    }
    for name, text in files.items():
        os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
        (tmp_path / name).write_text(text)
    problems = "\n".join(violations(graph(str(tmp_path))))
    assert "prune/ imports efficiency.macs: prune.stat" in problems
    assert "prune/ imports dataset.lm: prune.stat" in problems
    assert "dataset.lm imports prune/ (prune.stat)" in problems  # a function-level import counts
    assert "opt_eval imports the entry script prune_opt" in problems
    assert "utils/ is not a leaf: utils.cli imports dataset.lm" in problems
    assert "import circle: pipelines.a -> pipelines.b -> pipelines.a" in problems
    assert "import circle: dataset.lm -> prune.stat -> dataset.lm" in problems


@pytest.mark.parametrize("package", ["prune", "quantize", "evaluate", "dataset", "efficiency"])
def test_the_algorithm_and_data_folders_never_name_a_model_family(package):
    """Module names of a family live in its adapter: no `.encoder.layer`, `.self_attn` in the
    code elsewhere (docstrings may give examples)."""
    for name, path in project_modules(ROOT).items():
        if name == package or name.startswith(package + "."):
            text = code_without_docstrings(path)
            for needle in ("self_attn", "encoder.layer", "intermediate.dense", "mlp.down_proj", "fc2"):
                assert needle not in text, f"{path} names the module {needle}"
