"""The package's shape, checked on its source: layers that import only downwards, no import cycle
(imports inside functions count), training and inference apart, short functions, a CLI that
starts without torch, and tests that stand on their own.

docs/architecture.md draws the same layers; change both together.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
TESTS = ROOT / "tests"

# Lowest first. A module may import modules of its own layer and of the layers below it, never above.
LAYERS = (
    ("imgrec", "imgrec.utils", "imgrec.config", "imgrec.plots", "imgrec.progress", "imgrec.calibration"),  # dataclass configs, small helpers, progress bars, calibration arithmetic
    ("imgrec.hardware", "imgrec.distributed", "imgrec.card"),  # device and precision, the process group, the model card
    ("imgrec.data",),  # datasets, labels files, decoding, transforms, loaders, shards
    ("imgrec.models",),  # timm by name, weights files, model directories
    ("imgrec.recipe",),  # flags > YAML > the weights' card > the architecture's defaults
    ("imgrec.engine", "imgrec.inference"),  # training (trainer, tasks) and inference (backends), side by side
    ("imgrec.serve", "imgrec.report", "imgrec.demo"),  # above both
    ("imgrec.cli", "imgrec.__main__"),  # on top: nothing imports it
)
# Side by side on one layer: neither imports the other.
APART = (("imgrec.engine", "imgrec.inference"),)
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted((SRC / "imgrec").rglob("*.py"))}


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The imgrec modules ``name`` imports anywhere in its file (top level, functions, branches)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 packages
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from imgrec.data import folder`` imports the module imgrec.data.folder
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # ``import imgrec.data.folder.x``: the deepest module named
                target = target.rpartition(".")[0]
            if target.startswith("imgrec") and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def layer(name: str) -> int:
    matches = [(len(prefix), index) for index, group in enumerate(LAYERS) for prefix in group if name == prefix or name.startswith(prefix + ".")]
    assert matches, f"{name} is on no layer: add it to LAYERS (and to docs/architecture.md)"
    return max(matches)[1]


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of ``graph``, each a list of modules that reach one another."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_import_walker_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = "import os\n\ndef f():\n    from imgrec.data import folder\n    import imgrec.config\n    from imgrec.engine.trainer import Trainer\n"
    path = tmp_path / "probe.py"
    path.write_text(source)
    known = {"imgrec.data": Path(), "imgrec.data.folder": Path(), "imgrec.config": Path(), "imgrec.engine": Path(), "imgrec.engine.trainer": Path()}
    assert imported("imgrec.x", path, known) == {"imgrec.data.folder", "imgrec.config", "imgrec.engine.trainer"}


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert [c for c in strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) if len(c) > 1] == [["a", "b", "c"]]


def test_no_import_cycle_in_the_package() -> None:
    cycles = [c for c in strongly_connected(import_graph()) if len(c) > 1]
    assert not cycles, f"import cycles (each group imports itself through the others): {cycles}"


def test_every_import_runs_down_the_layers() -> None:
    graph = import_graph()
    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer(b) > layer(a))
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_training_and_inference_do_not_import_each_other() -> None:
    graph = import_graph()
    crossing = sorted(
        f"{a} -> {b}"
        for a, targets in graph.items()
        for b in targets
        for left, right in APART
        for x, y in ((left, right), (right, left))
        if (a == x or a.startswith(x + ".")) and (b == y or b.startswith(y + "."))
    )
    assert not crossing, "training and inference must stand side by side:\n" + "\n".join(crossing)


def test_nothing_imports_the_cli() -> None:
    graph = import_graph()
    users = sorted(a for a, targets in graph.items() for b in targets if b.startswith("imgrec.cli") and not a.startswith(("imgrec.cli", "imgrec.__main__")))
    assert not users, f"the CLI is the top: {users} import it"


def test_no_function_is_longer_than_sixty_lines() -> None:
    long = []
    for path in sorted((SRC / "imgrec").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 60 lines:\n" + "\n".join(long)


def test_the_cli_builds_every_parser_without_torch() -> None:
    """`imgrec --help` and each command's --help stay fast: building the parser imports no torch,
    timm, torchvision or server (the time itself is measured by benchmarks/cli_startup.py)."""
    code = (
        "import sys\n"
        "from imgrec.cli import build_parser\n"
        "build_parser()\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'torchvision', 'starlette', 'onnxruntime', 'matplotlib') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "", f"building the CLI's parsers imported {done.stdout.strip()}"


def test_test_modules_do_not_import_each_other() -> None:
    offenders = []
    for path in sorted(TESTS.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name} imports {n}" for n in names if n.split(".")[0].startswith("test_")]
    assert not offenders, "shared fixtures belong in conftest.py or a helper module:\n" + "\n".join(offenders)


def test_test_files_are_named_after_behaviour() -> None:
    historical = [p.name for p in TESTS.glob("test_*.py") if re.search(r"review|issue", p.name)]
    assert not historical, f"name test files after what they check, not after their history: {historical}"
