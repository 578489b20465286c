"""bench.py on CPU: the tiny config, two timed steps, one JSON line with every field the table needs."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def test_bench_runs_on_cpu_and_prints_one_json_line(tmp_path):
    out = subprocess.run([sys.executable, "bench.py", "configs/tiny.toml", "--steps", "2", "--warmup", "1",
                          "--train.global_batch_size=8", "--checkpoint", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("config", "device", "torch", "layout", "global_batch", "micro_batch", "seq_len", "tokens_per_sec",
                "tflops", "mfu", "step_time_s", "peak_memory_gb", "plan_gb", "checkpoint_sync_block_s",
                "checkpoint_async_block_s"):
        assert key in r, key
    assert r["device"] == "cpu" and r["mfu"] is None and r["tokens_per_sec"] > 0 and r["global_batch"] == 8
    assert "bench" in out.stderr  # the progress bar

def test_bench_refuses_a_bad_layout_in_one_line():
    out = subprocess.run([sys.executable, "bench.py", "configs/tiny.toml", "--parallel.tp=3"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and out.stderr.startswith("error: layout refused") and "Traceback" not in out.stderr
