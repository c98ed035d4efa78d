"""The scripts under benchmarks/ that produce BENCHMARKS.md's tables."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_profile_breakdown_accounts_for_the_whole_step(tmp_path):
    out = tmp_path / 'profile.json'
    proc = subprocess.run([sys.executable, REPO / 'benchmarks' / 'profile_breakdown.py', '--cases',
                           'xcit_nano_12_p16_224:2', '--img-size', '64', '--json', out],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data['gemm_peak_gflops'] > 1 and data['cpu']
    assert [row['mode'] for row in data['rows']] == ['infer', 'train']
    infer, train = data['rows']
    for row in data['rows']:
        shares = [v for k, v in row.items() if k.endswith('%')]
        assert len(shares) == 4 and abs(sum(shares) - 100) < 0.5 and row['matmul %'] > 0
        assert 0 < row['floor_fraction'] <= 1 and row['floor_ms'] < row['step_ms']
    assert train['gflop'] > 2.5 * infer['gflop']  # the backward costs about twice the forward


def test_the_ratio_range_is_that_of_the_rounds_taken_in_turns():
    """A slow moment hits both implementations in the same round: it must not show as a ratio of thousands."""
    from xcit.bench import Result, ratios
    def result(impl, rounds):
        median = sorted(rounds)[len(rounds) // 2]
        return Result('m', impl, 'infer', 1, 224, 196, 1e3 / median, median, (max(rounds) - min(rounds)) / 2,
                      None, 1.0, 1.0, 'cpu', rounds)
    timm, ours = result('timm', [400.0, 410.0, 1200.0]), result('xcit', [300.0, 320.0, 900.0])
    (row,) = ratios([timm, ours])
    assert row['speedup_range'] == (round(410 / 320, 3), round(1200 / 900, 3))
