"""The package's imports point down: models are a leaf, the engine knows no task, nothing reaches into another
package's private modules, and no modules import each other in a cycle."""
import ast
import shutil
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / 'src'

# lowest first; a package may import from lower layers only (and from itself)
LAYERS = [
    {'registry', 'config', 'seeding', 'allocator'},
    {'models', 'data', 'metrics', 'ssl'},
    {'checkpoints'},
    {'factory', 'viz', 'export', 'passl_config'},
    {'bench', 'engine', 'dense'},
    {'tasks', 'bench_dense'},
    {'cli'},
]
RANK = {package: level for level, packages in enumerate(LAYERS) for package in packages}
ROOT_RANK = len(LAYERS)  # xcit/__init__.py: the public API, above everything


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix('').parts)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def import_graph(src: Path) -> dict[str, set[str]]:
    """module -> the package modules it imports, at any depth of the file (lazy imports count)."""
    files = {_module_name(p, src): p for p in (src / 'xcit').rglob('*.py')}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        package = module if path.name == '__init__.py' else module.rpartition('.')[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.split('.')[0] == 'xcit')
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split('.')[:len(package.split('.')) - node.level + 1]
                    source = '.'.join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ''
                if source.split('.')[0] != 'xcit':
                    continue
                for alias in node.names:  # `from pkg import submodule` imports the submodule
                    targets.add(f'{source}.{alias.name}' if f'{source}.{alias.name}' in files else source)
        graph[module] = targets - {module}
    return graph


def _package(module: str) -> str:
    parts = module.split('.')
    return parts[1] if len(parts) > 1 else ''


def _rank(module: str) -> int:
    return RANK.get(_package(module), ROOT_RANK) if _package(module) else ROOT_RANK


def violations(src: Path) -> list[str]:
    graph, found = import_graph(src), []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if _package(target) == _package(module):
                continue
            if _package(target) and _package(target) not in RANK:
                found.append(f'{module} -> {target}: package {_package(target)!r} has no layer')
            elif _rank(target) >= _rank(module):
                found.append(f'{module} -> {target}: imports upward (or sideways)')
            elif any(part.startswith('_') for part in target.split('.')[2:]):
                found.append(f'{module} -> {target}: reaches into a private module of another package')
    return found + [f'import cycle: {" -> ".join(c)}' for c in cycles(graph)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules that import each other (depth-first)."""
    found, state = [], {}  # state: 1 on the current path, 2 done

    def visit(module, path):
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_every_package_has_a_layer():
    packages = {_package(m) for m in import_graph(SRC)} - {''}
    assert packages <= set(RANK), f'add {sorted(packages - set(RANK))} to LAYERS'


def test_imports_point_down_without_cycles():
    assert violations(SRC) == []


def test_the_check_catches_an_upward_import_a_private_one_and_a_cycle(tmp_path):
    shutil.copytree(SRC / 'xcit', tmp_path / 'xcit')
    layers = tmp_path / 'xcit' / 'models' / 'layers.py'
    layers.write_text(layers.read_text() + '\n\ndef _late():\n    from ..engine import fit  # noqa\n')
    bench = tmp_path / 'xcit' / 'bench.py'
    bench.write_text(bench.read_text() + '\nfrom .models._base import ClassifierMixin  # noqa\n')
    paddle = tmp_path / 'xcit' / 'checkpoints' / 'paddle.py'
    paddle.write_text(paddle.read_text() + '\nfrom .io import read_checkpoint  # noqa\n')
    found = violations(tmp_path)
    assert any(v.startswith('xcit.models.layers -> xcit.engine') and 'upward' in v for v in found), found
    assert any(v.startswith('xcit.bench -> xcit.models._base') and 'private' in v for v in found), found
    assert any('cycle' in v and 'xcit.checkpoints.io' in v and 'xcit.checkpoints.paddle' in v for v in found), found
