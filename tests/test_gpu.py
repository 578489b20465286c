"""On a CUDA GPU (skipped elsewhere): compile + FlexAttention document masks in bf16 against eager,
no recompiles, one block mask per micro-step, a bit-identical resume, and the memory plan."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

import bench  # noqa: E402
import data  # noqa: E402
import model as model_py  # noqa: E402
import parallel  # noqa: E402
import train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--model.hidden_size=256", "--model.intermediate_size=1024", "--model.num_hidden_layers=2",
         "--model.num_attention_heads=4", "--model.num_key_value_heads=2", "--model.head_dim=64",
         "--data.seq_len=512", "--train.global_batch_size=8", "--train.micro_batch_size=2",
         "--train.dtype=bfloat16", "--train.device=cuda", "--train.lr=1e-3", "--train.warmup_steps=5",
         "--train.optimizer=ademamix", "--train.ademamix_warmup=20"]

def learnable_batches(cfg, steps, period=16, doc_len=100):
    """Documents that repeat a random pattern of 8 ids: the loss falls from ln(V) within 20 steps."""
    t, T, V = cfg["train"], cfg["data"].seq_len, cfg["model"].vocab_size
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        rows = torch.randint(4, 12, (t.global_batch_size, period), generator=g).repeat(1, T // period + 1)[:, :T + 1]
        rows[:, 0::doc_len] = 1                  # <s> every doc_len tokens
        rows[:, doc_len - 1::doc_len] = 2        # </s> just before
        mb = t.micro_batch_size
        out.append([data.Batch(rows[k:k + mb, :-1].contiguous(), rows[k:k + mb, 1:].contiguous(), None,
                               torch.zeros(mb, dtype=torch.int64)) for k in range(0, t.global_batch_size, mb)])
    return out

def run_steps(compile, steps=20, device="cuda"):
    torch._dynamo.reset()
    cfg = train.load_config(os.path.join(ROOT, "configs/tiny.toml"),
                            SMALL + [f"--train.compile={str(compile).lower()}", f"--train.device={device}"])
    grid = parallel.Grid(device=torch.device(device))
    m = train.build(cfg, grid, grid.device)
    opt = parallel.DistributedOptimizer(m, grid, train.make_optimizer(cfg["train"]))
    batches = learnable_batches(cfg, steps)
    calls = []
    real = model_py.make_block_mask
    model_py.make_block_mask = lambda *a: calls.append(1) or real(*a)
    losses, graphs = [], []
    try:
        for b in batches:
            loss, *_ = train.train_step(m, opt, b, 1e-3, cfg["train"], grid)
            losses.append(loss)
            graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    finally:
        model_py.make_block_mask = real
    return losses, graphs, len(calls), cfg

def test_compiled_flex_bf16_follows_eager_without_recompiles():
    eager, _, eager_masks, cfg = run_steps(compile=False)
    compiled, graphs, masks, _ = run_steps(compile=True)
    micro_steps = cfg["train"].global_batch_size // cfg["train"].micro_batch_size
    assert masks == eager_masks == 20 * micro_steps  # one block mask per micro-step, shared by the layers
    assert graphs[-1] == graphs[0], f"recompiled after step 1: {graphs}"
    for a, b in zip(eager, compiled):
        assert abs(a - b) <= 2e-2 * abs(a), (eager, compiled)  # bf16: a few ulp of drift over 20 steps
    assert compiled[-1] < compiled[0] - 0.5  # and it learns

def cli(*args):
    return subprocess.run([sys.executable, "train.py", "configs/tiny.toml", *SMALL, "--train.compile=true",
                           "--train.log_interval=1", "--train.sample_tokens=0", "--train.eval_interval=0", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)

def test_save_and_resume_on_cuda_is_bit_identical(tmp_path):
    a, b = tmp_path / "straight", tmp_path / "resumed"
    assert cli("--train.max_steps=8", "--train.checkpoint_interval=4", f"--train.out_dir={a}").returncode == 0
    out = cli("--train.max_steps=4", "--train.checkpoint_interval=4", f"--train.out_dir={b}")
    assert out.returncode == 0, out.stderr[-3000:]
    out = cli("--train.max_steps=8", "--train.checkpoint_interval=4", f"--train.out_dir={b}")
    assert out.returncode == 0 and "resumed from" in out.stdout, out.stderr[-3000:]
    la = {r["step"]: r for r in map(json.loads, open(a / "metrics.jsonl"))}
    lb = {r["step"]: r for r in map(json.loads, open(b / "metrics.jsonl"))}
    for step in range(5, 9):
        assert la[step]["loss"] == lb[step]["loss"], (step, la[step]["loss"], lb[step]["loss"])
    assert la[8]["peak_memory_gb"] > 0 and la[8]["mfu"] is not None

def test_plan_is_within_ten_percent_of_the_measured_peak():
    args = ["configs/apertus-1b.toml", "--model.num_hidden_layers=4", "--data.seq_len=2048",
            "--train.global_batch_size=4", "--train.micro_batch_size=2"]
    out = subprocess.run([sys.executable, "bench.py", *args, "--steps=2", "--warmup=2"], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert abs(r["plan_gb"] - r["peak_memory_gb"]) <= 0.1 * r["peak_memory_gb"], r
