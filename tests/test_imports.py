"""The import structure: no module of rlx imports one that imports it back, and nothing below the
commands (the math, models, rewards, tasks, data, rollout, loops) imports the commands.

Read statically from the source (every import statement, including those inside functions and under
``TYPE_CHECKING``), so a cycle hidden in a lazy import is found too.
"""

from __future__ import annotations

import ast
from pathlib import Path

RLX = Path(__file__).resolve().parents[1] / "rlx"

# The command layer: what a user runs. Nothing below it may import it.
COMMANDS = ("rlx.cli", "rlx.commands", "rlx.train")
BELOW = (
    "rlx.advantages",
    "rlx.kl",
    "rlx.losses",
    "rlx.masked",
    "rlx.models",
    "rlx.rewards",
    "rlx.tasks",
    "rlx.data",
    "rlx.rollout",
    "rlx.loops",
    "rlx.evaluate",
    "rlx.registry",
    "rlx.runtime",
    "rlx.settings",
    "rlx.errors",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(RLX.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The rlx modules ``path`` imports (the most specific module each import names)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up (level - 1) packages
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], base]).strip(".")
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != me:
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    files = [p for p in RLX.rglob("*.py")]
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
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
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_one_that_imports_it_back():
    found = cycles(graph())
    assert not found, f"import cycles: {found}"


def test_nothing_below_the_commands_imports_them():
    g = graph()
    upward = sorted(
        f"{m} -> {d}" for m, deps in g.items() if m.startswith(BELOW) for d in deps if d.startswith(COMMANDS)
    )
    assert not upward, f"upward imports: {upward}"


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
