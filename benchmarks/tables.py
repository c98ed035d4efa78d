"""The speed tables of README.md and BENCHMARKS.md, from the `xcit bench` JSON files they quote.

    python benchmarks/tables.py            # print the table of every measured CPU
    python benchmarks/tables.py --write    # rewrite the tables between the markers in README.md and BENCHMARKS.md

Each file under benchmarks/results/<machine>/compare_*.json is one side-by-side run
(`xcit bench --impls xcit,xcit-optimized,xcit-compiled,timm,timm-compiled`); the
CPU named in a row is the one recorded in that file's environment, so a ratio is
never shown without the machine that produced it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'benchmarks' / 'results'
BEGIN, END = '<!-- speed-table:begin (benchmarks/tables.py --write) -->', '<!-- speed-table:end -->'
DOCUMENTS = (ROOT / 'README.md', ROOT / 'BENCHMARKS.md')


def _throughput(results: list[dict]) -> dict[tuple[str, str], float]:
    return {(r['impl'], r['mode']): r['samples_per_sec'] for r in results}


def _peak(results: list[dict]) -> dict[tuple[str, str], float | None]:
    return {(r['impl'], r['mode']): r['peak_mb'] for r in results}


def _ratio(table: dict, ours: tuple[str, str], theirs: tuple[str, str]) -> str:
    if ours not in table or theirs not in table or not table[theirs]:
        return '-'
    return f'{table[ours] / table[theirs]:.2f}x'


def rows(results_dir: Path = RESULTS) -> list[dict]:
    """One row per compare file: its CPU, model, batch and every ratio against timm."""
    out = []
    for path in sorted(results_dir.glob('*/compare_*.json')):
        data = json.loads(path.read_text())
        results = data['results']
        speed, peak = _throughput(results), _peak(results)
        first = results[0]
        memory = []
        for mode in ('infer', 'train'):
            ours, theirs = peak.get(('xcit', mode)), peak.get(('timm', mode))
            memory.append(f'{ours / theirs:.2f}' if ours and theirs else '-')
        out.append(dict(
            cpu=data['environment']['processor'], date=data['environment']['date'],
            file=(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path).as_posix(),
            model=f"{first['model']} (b{first['batch_size']})",
            paths='timed here' if data['environment'].get('fast_path') == 'auto' else 'fixed rule',
            infer=_ratio(speed, ('xcit', 'infer'), ('timm', 'infer')),
            optimized=_ratio(speed, ('xcit-optimized', 'infer'), ('timm', 'infer')),
            infer_compiled=_ratio(speed, ('xcit-compiled', 'infer'), ('timm-compiled', 'infer')),
            train=_ratio(speed, ('xcit', 'train'), ('timm', 'train')),
            train_compiled=_ratio(speed, ('xcit-compiled', 'train'), ('timm-compiled', 'train')),
            memory=' / '.join(memory)))
    return out


def markdown(table_rows: list[dict]) -> str:
    lines = ['| CPU (date) | fast paths | model (batch) | inference, eager | optimized vs timm eager | inference, '
             'compiled vs compiled | training, eager | training, compiled vs compiled | peak memory, inference / training |',
             '|---|---|---|---|---|---|---|---|---|']
    for r in table_rows:
        lines.append(f"| {r['cpu']} ({r['date']}) | {r['paths']} | [{r['model']}]({r['file']}) | {r['infer']} | "
                     f"{r['optimized']} | "
                     f"{r['infer_compiled']} | {r['train']} | {r['train_compiled']} | {r['memory']} |")
    return '\n'.join(lines)


def with_table(text: str, table: str) -> str:
    """`text` with what lies between the markers replaced by `table` (unchanged if it has no markers)."""
    if BEGIN not in text:
        return text
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f'{head}{BEGIN}\n{table}\n{END}{tail}'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--write', action='store_true', help='rewrite the tables in README.md and BENCHMARKS.md')
    args = parser.parse_args()
    table = markdown(rows())
    if not args.write:
        print(table)
        return
    for doc in DOCUMENTS:
        doc.write_text(with_table(doc.read_text(), table))
        print(f'wrote {doc.relative_to(ROOT)}')


if __name__ == '__main__':
    main()
