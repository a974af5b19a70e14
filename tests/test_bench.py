from __future__ import annotations

import pytest

from toilcoord._tools import bench

from conftest import run_python

pytestmark = pytest.mark.timeout(180)


def test_rows_without_a_target_never_fail_the_run(monkeypatch, capsys):
    rows = [
        bench.Row("met", 1.0, 1.0, "us", 1.0, "<= 1.5x", True),
        bench.Row("information", 1.0, 9.0, "acq/s", 0.1, "", None),
    ]
    monkeypatch.setattr(bench, "measure", lambda *args: rows)
    assert bench.run_bench(None, 1, True, False) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "1 targets met, 0 missed; 1 rows information only"


def test_the_contended_row_has_a_target_and_toils_design_informs(tmp_path):
    rows = bench.bench_contended(str(tmp_path), 2, bench.QUICK)
    assert [row.target for row in rows] == [">= 0.8x", ""]
    assert rows[1].ok is None


@pytest.mark.parametrize(
    "only, row",
    [("mutex", "mutex acquire+release"), ("contended mutex", "contended mutex, 4 processes")],
)
def test_a_slowed_mutex_misses_its_target_and_the_run_exits_1(only, row):
    # The mutex path made to do extra work (a 1 ms sleep per acquisition,
    # against a floor of microseconds): the target must be reported missed.
    done = run_python(
        """
        import sys, time
        from toilcoord._tools import bench
        real = bench.global_mutex

        class slow_mutex(real):
            def __enter__(self):
                time.sleep(0.001)
                return super().__enter__()

        bench.global_mutex = slow_mutex
        sys.exit(bench.run_bench(None, 4, True, False, [sys.argv[1]]))
    """,
        only,
        timeout=150,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "MISSED" in done.stdout
    assert f"missed ({row}" in done.stdout.splitlines()[-1]
