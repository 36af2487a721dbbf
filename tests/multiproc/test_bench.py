"""`python -m pipeline.bench` without its data: one line naming the directory and --data-root,
exit 3, before anything runs. (The benchmark's arithmetic: tests/unit/test_bench.py; a quick
benchmark on the real MNIST: tests/integration/test_bench.py.)"""

from helpers import run_bench


def test_missing_data_is_one_line_and_exit_3(tmp_path):
    proc = run_bench(["--data-root", str(tmp_path), "--quick"], timeout=120)
    assert proc.returncode == 3
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path) in lines[0] and "--data-root" in lines[0], lines
