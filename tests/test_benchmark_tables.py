"""The speed tables of README.md and BENCHMARKS.md are what benchmarks/tables.py makes of the result
files, and every row names the CPU its file was measured on."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tables():
    spec = importlib.util.spec_from_file_location('tables', ROOT / 'benchmarks' / 'tables.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_documents_quote_the_result_files():
    tables = _tables()
    table = tables.markdown(tables.rows())
    for doc in tables.DOCUMENTS:
        text = doc.read_text()
        assert tables.BEGIN in text and tables.END in text, doc.name
        assert tables.with_table(text, table) == text, f'{doc.name} is stale: run python benchmarks/tables.py --write'


def test_every_row_names_the_cpu_of_its_file():
    tables = _tables()
    rows = tables.rows()
    lines = tables.markdown(rows).splitlines()[2:]
    for row, line in zip(rows, lines, strict=True):
        data = json.loads((ROOT / row['file']).read_text())
        assert line.startswith(f"| {data['environment']['processor']} (")
    assert {'AMD EPYC', 'Intel(R) Xeon(R) Processor'} <= {row['cpu'] for row in rows}


def test_the_table_follows_the_numbers_in_the_files(tmp_path):
    tables = _tables()
    source = next((ROOT / 'benchmarks' / 'results').glob('*/compare_*.json'))
    (tmp_path / 'machine').mkdir()
    copied = tmp_path / 'machine' / source.name
    shutil.copy(source, copied)
    before = tables.rows(tmp_path)
    data = json.loads(copied.read_text())
    for result in data['results']:
        if (result['impl'], result['mode']) == ('timm', 'infer'):
            result['samples_per_sec'] /= 2  # timm's inference twice as slow: our ratio doubles
    copied.write_text(json.dumps(data))
    after = tables.rows(tmp_path)
    assert float(after[0]['infer'].rstrip('x')) == pytest.approx(2 * float(before[0]['infer'].rstrip('x')), rel=0.02)
