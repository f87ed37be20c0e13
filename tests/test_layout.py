"""The layout a reader relies on: the paper's modules stand on their own (nothing from
Diffusion/Run, nothing from DiffusionFreeGuidence), the modules import each other without a
cycle, and every name in the README's map from the paper to the code is in the file it names."""
import ast
import re
from collections import defaultdict

import pytest

from conftest import REPO

PAPER = ["Model", "Diffusion", "Schedule", "DDIM", "Solvers", "Likelihood", "Latents", "EMA", "Editing"]
PACKAGES = ["Diffusion", "DiffusionFreeGuidence", "Conversion"]


def module_name(path):
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def imported_modules(path):
    """The modules `path` imports (`from X import Y`: X, and X.Y where that is a module of ours)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def our_modules():
    """{module name: path} of the repo's own modules: the packages and the top-level scripts."""
    paths = [path for package in PACKAGES for path in (REPO / package).rglob("*.py")]
    paths += list(REPO.glob("*.py"))
    return {module_name(path): path for path in paths}


@pytest.mark.parametrize("name", PAPER)
def test_the_papers_modules_import_nothing_from_the_machinery_or_guidance(name):
    imports = imported_modules(REPO / "Diffusion" / f"{name}.py")
    assert not [module for module in imports if module.startswith(("Diffusion.Run", "DiffusionFreeGuidence"))]


def test_nothing_in_diffusion_imports_guidance():
    for path in (REPO / "Diffusion").rglob("*.py"):
        assert not [m for m in imported_modules(path) if m.startswith("DiffusionFreeGuidence")], path


def test_the_modules_import_each_other_without_a_cycle():
    modules = our_modules()
    graph = {name: sorted(m for m in imported_modules(path) if m in modules and m != name)
             for name, path in modules.items()}
    state = {}

    def visit(name, path):
        state[name] = "open"
        for other in graph[name]:
            assert state.get(other) != "open", f"import cycle: {' -> '.join(path + [other])}"
            if other not in state:
                visit(other, path + [other])
        state[name] = "done"
    for name in graph:
        if name not in state:
            visit(name, [name])


def names_defined(path):
    """(top-level names, {class: its methods, attributes and registered buffers}) of a file."""
    tree = ast.parse(path.read_text())
    top, members = set(), defaultdict(set)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            top.add(node.name)
        elif isinstance(node, ast.Assign):
            top.update(target.id for target in node.targets if isinstance(target, ast.Name))
        if not isinstance(node, ast.ClassDef):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.FunctionDef):
                members[node.name].add(inner.name)
            elif isinstance(inner, ast.Attribute) and isinstance(inner.ctx, ast.Store):
                members[node.name].add(inner.attr)
            elif (isinstance(inner, ast.Call) and getattr(inner.func, "attr", None) == "register_buffer"
                  and isinstance(inner.args[0], ast.Constant)):
                members[node.name].add(inner.args[0].value)
    return top, members


def paper_map():
    """[(file, name)] of the README's map: in each row's code cell, the names after a file path
    (outside parentheses, which name config keys and values)."""
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("| paper | code |"):].split("\n\n")[0].splitlines()[2:]
    pairs = []
    for row in table:
        code = re.sub(r"\([^)]*\)", "", row.rstrip(" |").rsplit(" | ", 1)[1])
        file = None
        for token in re.findall(r"`([^`]+)`", code):
            if token.endswith(".py"):
                file = token
            else:
                assert file, f"a name before any file in the README's map: {row}"
                pairs.append((file, token))
    return pairs


def test_the_readme_map_has_rows():
    assert len(paper_map()) >= 30


@pytest.mark.parametrize("file, name", paper_map())
def test_every_name_in_the_readmes_paper_map_is_in_the_file_it_names(file, name):
    top, members = names_defined(REPO / file)
    owner, _, member = name.rpartition(".")
    if owner:
        assert owner in top and member in members[owner], f"{file} has no {name}"
    else:
        assert name in top or any(name in names for names in members.values()), f"{file} has no {name}"


def test_every_state_that_state_takes_runs_a_function():
    """docs/code.md: a new state's name is in Keys.STATES (the words --state takes) and in
    Scripts.STATES (the function it runs); the two list the same states."""
    from Diffusion.Run import Keys, Scripts
    assert set(Keys.STATES) == set(Scripts.STATES)
    assert all(callable(state) for state in Scripts.STATES.values())
