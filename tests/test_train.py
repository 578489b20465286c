"""The recipe against its references, and the single-process loop: resume, errors, a real run."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import model as model_py
import parallel
import plan
import train
from conftest import train_in_process
from model import Apertus, ModelConfig, document_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--train.log_interval=1", "--train.sample_tokens=0", "--train.eval_interval=0"]

def cli(*args):
    return train_in_process(*args)

# ----------------------------------------------------------------------------- Goldfish
def goldfish_reference(labels, k=50, h=50):
    """The Goldfish mask of the Apertus data pipeline (tech report arXiv 2509.14233; Goldfish, arXiv
    2406.10209), literally: one sequence at a time."""
    table = torch.rand(1_000_003, generator=torch.Generator().manual_seed(2971215073))
    keys = labels.unfold(0, h, 1).prod(dim=-1) % 1_000_003
    drop_window = table[keys] < 1 / k
    drop = torch.zeros_like(labels, dtype=torch.bool)
    for j in range(len(keys)):
        drop[j + h - 1] = drop_window[j]
    return drop

def test_goldfish_matches_the_reference_algorithm():
    torch.manual_seed(0)
    labels = torch.randint(0, 131072, (3, 700))  # products of 50 ids wrap around int64
    labels[1, 100:160] = 7  # repeated windows share a key
    got = train.goldfish_mask(labels)
    for row, mask in zip(labels, got):
        assert torch.equal(mask, goldfish_reference(row))
        assert torch.equal(train.goldfish_mask(row), mask)  # [T] as well as [B, T]
    assert not got[:, :49].any()
    small = torch.randint(1, 1000, (20, 4096))
    frac = train.goldfish_mask(small, k=50, h=13).float().mean().item()
    assert 0.01 < frac < 0.03  # about 1/k where the products do not collapse
    assert torch.equal(train.goldfish_mask(small[0], 10, 5), goldfish_reference(small[0], 10, 5))

# ----------------------------------------------------------------------------- AdEMAMix
class ReferenceAdEMAMix(torch.optim.Optimizer):
    """apple/ml-ademamix's pytorch/ademamix.py (linear_warmup_scheduler, linear_hl_warmup_scheduler with
    eps inside the half-life log, beta1 = 0 skipping the fast EMA), written out plainly."""

    def __init__(self, params, lr, betas, alpha, T_alpha_beta3, eps, weight_decay):
        super().__init__(params, dict(lr=lr, betas=betas, alpha=alpha, T=T_alpha_beta3, eps=eps, wd=weight_decay))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            b1, b2, b3_final = g["betas"]
            f = lambda beta, eps=1e-8: math.log(0.5) / math.log(beta + eps) - 1
            f_inv = lambda t: math.pow(0.5, 1 / (t + 1))
            for p in g["params"]:
                st = self.state[p]
                if not st:
                    st["step"], st["m1"], st["m2"], st["v"] = 0, *(torch.zeros_like(p) for _ in range(3))
                st["step"] += 1
                t = st["step"]
                bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
                if t < g["T"]:
                    a = t / float(g["T"])
                    alpha = (1.0 - a) * 0 + a * g["alpha"]
                    beta3 = f_inv((1.0 - a) * f(b1) + a * f(b3_final))
                else:
                    alpha, beta3 = g["alpha"], b3_final
                if b1 != 0.0:
                    st["m1"].mul_(b1).add_(p.grad, alpha=1 - b1)
                    m1 = st["m1"]
                else:
                    m1 = p.grad
                st["m2"].mul_(beta3).add_(p.grad, alpha=1 - beta3)
                st["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (st["v"].sqrt() / math.sqrt(bc2)).add_(g["eps"])
                update = (m1.div(bc1) + alpha * st["m2"]) / denom
                update.add_(p, alpha=g["wd"])
                p.add_(-g["lr"] * update)

@pytest.mark.parametrize("beta1", [0.9, 0.0])
def test_ademamix_follows_apple_reference_over_1000_steps_with_warmups(beta1):
    torch.manual_seed(0)
    shapes = [(8, 5), (7,), (3, 4, 2)]
    a = [torch.randn(s, dtype=torch.float64) for s in shapes]
    b = [x.clone() for x in a]
    for x in a:
        x.grad = torch.zeros_like(x)
    kw = dict(lr=1e-2, alpha=8.0, eps=1e-8)
    ours = train.AdEMAMix(a, [0.1, 0.0, 0.1], betas=(beta1, 0.999, 0.9999), warmup=400, **kw)
    ref = [ReferenceAdEMAMix([y], betas=(beta1, 0.999, 0.9999), T_alpha_beta3=400, weight_decay=wd, **kw)
           for y, wd in zip(b, [0.1, 0.0, 0.1])]
    for step in range(1000):
        grads = [torch.randn(s, dtype=torch.float64) + 0.3 * math.sin(step / 7) for s in shapes]
        for x, y, g in zip(a, b, grads):
            x.grad.copy_(g)
            y.grad = g.clone()
        ours.step()
        for r in ref:
            r.step()
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=1e-7, atol=1e-9), (x - y).abs().max()
    assert ours.steps == 1000 and ("exp_avg" in ours.moments(0)) == (beta1 != 0)

def test_ademamix_schedules_and_a_step_count_past_float32():
    S = train.AdEMAMix.schedules
    assert S(400, 0.9, 0.9999, 8.0, 400) == (8.0, 0.9999) and S(0, 0.9, 0.9999, 8.0, 400)[0] == 0.0
    assert S(0, 0.9, 0.9999, 8.0, 400)[1] == pytest.approx(0.9, rel=1e-6)  # starts at beta1
    x = torch.zeros(3, dtype=torch.float64)
    x.grad = torch.ones(3, dtype=torch.float64)
    opt = train.AdEMAMix([x], [0.0], lr=1e-3, warmup=None)
    opt.steps = 2**24 + 1  # float32 cannot hold 2^24 + 2: the count is a Python int
    opt.step()
    assert opt.steps == 2**24 + 2 and isinstance(opt.steps, int)

def test_wsd_schedule():
    lr = lambda s: train.wsd_lr(s, 1.0, 0.1, 10, 80, 20, "1-sqrt")
    assert lr(0) == pytest.approx(0.1) and lr(9) == pytest.approx(1.0) and lr(50) == 1.0
    assert lr(80) == 1.0 and lr(85) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.25)))
    assert lr(100) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)
    assert train.wsd_lr(90, 1.0, 0.0, 10, 80, 20, "linear") == pytest.approx(0.5)

def test_no_weight_decay_on_norms_and_xielu():
    from model import Apertus, ModelConfig, role_of
    m = Apertus(ModelConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=8, vocab_size=32))
    named = list(m.named_parameters())
    for _, p in named:
        p.grad = torch.zeros_like(p)
    opt = train.make_optimizer(train.TrainConfig(weight_decay=0.1))([role_of(n, p) for n, p in named], [p for _, p in named])
    decayed = {id(t.untyped_storage()) for batch in opt.groups[0.1] for t in batch[0]}
    names = {n for n, p in named if id(p.untyped_storage()) in decayed}
    assert names == {n for n, p in named if p.dim() == 2}
    assert set(opt.groups) == {0.0, 0.1}

# ----------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("args,message", [
    (["configs/tiny.toml", "--train.nope=1"], "unknown key train.nope"),
    (["configs/tiny.toml", "--train.max_steps=abc"], "train.max_steps must be int, got 'abc'"),
    (["configs/tiny.toml", "--train.lr=true"], "train.lr must be float"),
    (["configs/tiny.toml", "--trian.lr=1"], "unknown section [trian]"),
    (["configs/missing.toml"], "config file configs/missing.toml not found"),
    (["configs/tiny.toml", "--data.dataset=/no/such/dir"], "/no/such/dir"),
    (["configs/tiny.toml", "--train.device=tpu"], "train.device must be one of auto, cpu, cuda"),
])
def test_bad_config_is_one_clear_line(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert train.main([*args, f"--train.out_dir={tmp_path}"]) == 2  # in this process: main catches, never raises
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err

# ----------------------------------------------------------------------------- the loop
def metrics(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["step"]: r for r in rows}

def test_resume_is_bit_identical(tmp_path):
    args = ["configs/tiny.toml", *FAST, "--train.checkpoint_interval=3", "--model.num_hidden_layers=2",
            "--data.seq_len=64", "--train.global_batch_size=8", "--train.micro_batch_size=4"]
    assert cli(*args, "--train.max_steps=12", f"--train.out_dir={tmp_path / 'straight'}").returncode == 0
    assert cli(*args, "--train.max_steps=6", f"--train.out_dir={tmp_path / 'resumed'}").returncode == 0
    out = cli(*args, "--train.max_steps=12", f"--train.out_dir={tmp_path / 'resumed'}")
    assert out.returncode == 0 and "resumed from" in out.stdout
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    for step in range(7, 13):
        assert a[step]["loss"] == b[step]["loss"], step
    for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "mfu"):
        assert key in a[12]
    kept = sorted(n for n in os.listdir(tmp_path / "resumed") if n.startswith("ckpt-"))
    assert kept == ["ckpt-00000006", "ckpt-00000009", "ckpt-00000012"]  # keep_checkpoints = 3

def test_bad_data_is_a_clear_error_and_harms_no_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert cli("configs/tiny.toml", *FAST, "--train.max_steps=2", f"--train.out_dir={run}").returncode == 0
    before = {n: open(run / "ckpt-00000002" / n, "rb").read() for n in os.listdir(run / "ckpt-00000002")}
    prefix = str(tmp_path / "bad")  # a Megatron-format dataset whose documents hold an id past the vocab
    with data.IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(400):
            writer.add_document(np.array([1, 300, 5, 2], dtype=np.uint16))
    out = cli("configs/tiny.toml", *FAST, "--train.max_steps=4", f"--train.out_dir={run}", f"--data.dataset={prefix}")
    assert out.returncode == 2 and "token id 300 >= vocab_size 272" in out.stderr and "Traceback" not in out.stderr
    raw = open(prefix + ".bin", "rb").read()
    open(prefix + ".bin", "wb").write(raw[:-10])
    out = cli("configs/tiny.toml", *FAST, "--train.max_steps=4", f"--train.out_dir={run}", f"--data.dataset={prefix}")
    assert out.returncode == 2 and "bad.bin: truncated" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    after = {n: open(run / "ckpt-00000002" / n, "rb").read() for n in os.listdir(run / "ckpt-00000002")}
    assert before == after and sorted(n for n in os.listdir(run) if n.startswith("ckpt-")) == ["ckpt-00000002"]

def test_an_interrupted_save_leaves_the_previous_checkpoint(tmp_path):
    assert cli("configs/tiny.toml", *FAST, "--train.max_steps=2", f"--train.out_dir={tmp_path}").returncode == 0
    os.makedirs(tmp_path / "ckpt-00000004.tmp")  # what a crash in the middle of a save leaves behind
    shutil.copy(tmp_path / "ckpt-00000002" / "rank-00000.safetensors", tmp_path / "ckpt-00000004.tmp")
    import checkpoint
    assert checkpoint.latest_checkpoint(str(tmp_path)).endswith("ckpt-00000002")

def test_tiny_trains_well_below_the_untrained_loss(tmp_path):
    out = cli("configs/tiny.toml", "--train.max_steps=100", "--train.eval_interval=0", "--train.warmup_steps=10",
              "--train.decay_steps=30", "--train.sample_tokens=40", f"--train.out_dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    val = metrics(tmp_path)[100]["val_loss"]  # 3.24 (60 steps: 3.37, too close to the bound)
    assert val < 0.6 * math.log(260), val  # untrained: about ln(vocab) = 5.6
    assert "sample:" in out.stdout

# ----------------------------------------------------------------------------- hardware-facing fixes
def test_mfu_counts_no_input_embedding_and_knows_the_h100_variants(monkeypatch):
    from model import ModelConfig, flops_per_token, param_count
    cfg = ModelConfig()  # Apertus-8B
    n = param_count(cfg)
    assert flops_per_token(cfg, 4096) == 6 * (n - 131072 * 4096) + 6 * 32 * 32 * 128 * 4096
    for name, peak in (("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
                       ("NVIDIA GH200 480GB", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12),
                       ("NVIDIA GeForce RTX 4090", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d, name=name: name)
        assert train.peak_flops(torch.device("cuda")) == peak, name
    assert train.peak_flops(torch.device("cpu")) is None

def test_goldfish_table_is_made_once_per_device():
    train.goldfish_mask(torch.randint(0, 100, (2, 60)))
    table = train._GOLDFISH_TABLE[torch.device("cpu")]
    train.goldfish_mask(torch.randint(0, 100, (2, 60)))
    assert train._GOLDFISH_TABLE[torch.device("cpu")] is table

def test_evaluation_time_is_not_counted_in_the_next_steps_tokens_per_sec(tmp_path, monkeypatch):
    """Each evaluation moves train.py's clock on by 100 s: a step that counted it would show under 41
    tokens/s. (A fake clock: the test does not depend on how fast this machine is.)"""
    import time
    skew = [0.0]
    monkeypatch.setattr(train, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: time.perf_counter() + skew[0])}))

    def evaluate(*a, **k):
        skew[0] += 100.0
        return {"demo-byte": 1.0}
    monkeypatch.setattr(train, "evaluate", evaluate)
    cfg = train.load_config(os.path.join(ROOT, "configs/tiny.toml"),
                            ["--train.max_steps=4", "--train.eval_interval=1", "--train.log_interval=1",
                             "--train.sample_tokens=0", "--train.checkpoint_interval=0", f"--train.out_dir={tmp_path}"])
    train.run(cfg)
    rows = metrics(tmp_path)
    assert skew[0] == 400 and all(rows[s]["tokens_per_sec"] > 16 * 256 / 50 for s in (1, 2, 3, 4)), rows

def test_one_block_mask_per_micro_batch_shared_by_every_layer(monkeypatch):
    """The FlexAttention mask is built once per micro-batch (not per layer) and handed to every layer
    (CPU: FlexAttention's forward only, as in evaluation)."""
    cfg = train.load_config(os.path.join(ROOT, "configs/tiny.toml"), ["--model.num_hidden_layers=3", "--data.seq_len=64",
                            "--train.global_batch_size=6", "--train.micro_batch_size=2"])
    grid = parallel.Grid()
    m = train.build(cfg, grid, grid.device)
    m.attn_backend = "flex"
    opt = parallel.DistributedOptimizer(m, grid, train.make_optimizer(cfg["train"]))
    built, seen = [], []
    real_make, real_attention = model_py.make_block_mask, model_py.attention
    monkeypatch.setattr(model_py, "make_block_mask", lambda *a: built.append(real_make(*a)) or built[-1])
    monkeypatch.setattr(model_py, "attention", lambda q, k, v, mask=None: seen.append(mask) or real_attention(q, k, v, mask))
    x = torch.randint(3, 260, (6, 65))
    x[:, 20] = 2  # a document boundary
    batches = [data.Batch(x[i:i + 2, :-1], x[i:i + 2, 1:], None, torch.zeros(2, dtype=torch.int64)) for i in (0, 2, 4)]
    with torch.no_grad():
        train.forward_backward(m.eval(), opt, batches, cfg["train"], grid, train=False)
    assert len(built) == 3 and len(seen) == 9  # 3 micro-batches, 3 layers
    assert all(seen[3 * i + j] is built[i] for i in range(3) for j in range(3))

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_planned_activations_are_what_autograd_keeps(dtype):
    """memory_plan's eager bytes per token and layer against the tensors autograd saves in one block's
    forward (the block's input counted: it is kept unless the norm's fp32 copy is a new tensor)."""
    cfg = ModelConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, vocab_size=64, rope_scaling=None, rope_theta=1e4)
    m = Apertus(cfg)
    m.init_weights(0)
    m.to(dtype)
    block, (B, T) = m.model.layers["0"], (2, 256)
    x = torch.randn(B, T, 256, dtype=dtype, requires_grad=True)
    cos, sin = model_py.rope_cos_sin(m.inv_freq, torch.arange(T).expand(B, T), dtype)
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, cos, sin, None)
    not_activations = {p.untyped_storage().data_ptr() for p in block.parameters()} | \
        {t.untyped_storage().data_ptr() for t in (cos, sin)}
    measured = sum(n for ptr, n in kept.items() if ptr not in not_activations) / (B * T)
    planned = plan.activation_bytes_per_token(cfg, 1, 1, dtype.itemsize, compiled=False)
    # CPU attention's output is already laid out as o_proj's input; FlexAttention's is copied: the plan
    # counts the copy (wb bytes per query feature)
    assert measured <= planned <= measured + dtype.itemsize * 256 + 64, (measured, planned)

def test_the_loss_is_normalised_over_the_global_batch_whatever_the_split():
    """Packed chat data with very unequal loss masks: the loss and the gradients are the same for 1, 2 or
    4 micro-batches, and the loss is the mean over the masked-in tokens of the whole global batch."""
    cfg = train.load_config(os.path.join(ROOT, "configs/tiny.toml"), ["--model.num_hidden_layers=1", "--data.seq_len=32",
                            "--train.global_batch_size=4", "--train.goldfish=false"])
    grid = parallel.Grid()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, 260, (4, 33), generator=g)
    packed = torch.zeros(4, 32, dtype=torch.bool)
    for row, n in enumerate((3, 29, 1, 15)):  # masked-in tokens per sequence
        packed[row, 32 - n:] = True
    results = []
    for micro in (4, 2, 1):
        m = train.build(cfg, grid, grid.device)
        opt = parallel.DistributedOptimizer(m, grid, train.make_optimizer(cfg["train"]))
        batches = [data.Batch(x[i:i + micro, :-1], x[i:i + micro, 1:], packed[i:i + micro], torch.zeros(micro, dtype=torch.int64))
                   for i in range(0, 4, micro)]
        loss, *_ = train.forward_backward(m, opt, batches, cfg["train"], grid)
        results.append((loss, opt.grad_buffer.clone()))
    with torch.no_grad():
        logits = m(x[:, :-1], doc_ids=document_ids(x[:, :-1], 2, 1))
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none").view(4, 32)
    counted = packed & (x[:, :-1] != 2)
    assert abs(results[0][0] - ce[counted].mean().item()) < 1e-5
    for loss, grads in results[1:]:
        assert abs(loss - results[0][0]) < 1e-6 and torch.allclose(grads, results[0][1], atol=1e-7, rtol=1e-5)

def test_checkpoint_never_stores_an_optimizer_step_as_a_tensor(tmp_path):
    from safetensors import safe_open
    assert cli("configs/tiny.toml", *FAST, "--train.max_steps=2", "--train.optimizer=ademamix",
               f"--train.out_dir={tmp_path}").returncode == 0
    ck = tmp_path / "ckpt-00000002"
    with safe_open(ck / "rank-00000.safetensors", "pt") as f:
        kinds = {k.split("|")[0] for k in f.keys()}
    assert kinds == {"master", "exp_avg", "exp_avg_slow", "exp_avg_sq", "rng"}
    assert json.load(open(ck / "meta.json"))["optimizer_steps"] == 2

def test_compiled_run_writes_the_same_checkpoint_names_resumes_eager_and_consolidates(tmp_path, monkeypatch):
    """train.compile with a one-layer model: no _orig_mod. anywhere, and the checkpoint is interchangeable
    with an eager run's. In this process, with TorchDynamo's eager backend: the names depend on how the
    blocks are wrapped, not on the code Inductor would generate (which takes minutes on 2 cores)."""
    import functools
    from safetensors import safe_open
    import checkpoint
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    small = [*FAST, "--model.num_hidden_layers=1", "--train.global_batch_size=4", "--train.micro_batch_size=4",
             "--data.seq_len=64"]

    def run(name, *args):
        cfg = train.load_config(os.path.join(ROOT, "configs/tiny.toml"), [*small, *args, f"--train.out_dir={tmp_path / name}"])
        return train.run(cfg)
    model = run("c", "--train.compile=true", "--train.max_steps=2")
    assert all(hasattr(b.forward, "_torchdynamo_orig_callable") for b in model.model.layers.values())  # compiled
    run("e", "--train.max_steps=2")
    names = []
    for name in ("c", "e"):
        with safe_open(tmp_path / name / "ckpt-00000002" / "rank-00000.safetensors", "pt") as f:
            names.append(sorted(f.keys()))
    assert names[0] == names[1] and not any("_orig_mod" in n for n in names[0])
    run("c", "--train.max_steps=3")  # the compiled run's checkpoint, resumed eager
    assert metrics(tmp_path / "c")[3]["step"] == 3
    checkpoint.consolidate(str(tmp_path / "c" / "ckpt-00000003"), str(tmp_path / "hf"))
    assert os.path.exists(tmp_path / "hf" / "model.safetensors")

MEMORY_PROBE = r"""
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
import train, parallel
T, V = int(sys.argv[2]), int(sys.argv[3])
cfg = train.load_config(sys.argv[1] + "/configs/tiny.toml", ["--model.num_hidden_layers=1", "--model.hidden_size=64",
      "--model.intermediate_size=128", f"--model.vocab_size={V}", f"--data.seq_len={T}", "--train.global_batch_size=1",
      "--train.micro_batch_size=1", "--train.goldfish=false"])
grid = parallel.Grid()
m = train.build(cfg, grid, grid.device)
opt = parallel.DistributedOptimizer(m, grid, train.make_optimizer(cfg["train"]))
import data
x = torch.randint(4, V, (1, T + 1))
batch = [data.Batch(x[:, :-1], x[:, 1:], None, torch.zeros(1, dtype=torch.int64))]
train.train_step(m, opt, batch, 1e-3, cfg["train"], grid)   # state, buffers and allocator warmed up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
train.train_step(m, opt, batch, 1e-3, cfg["train"], grid)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""

def test_the_loss_never_holds_the_full_logits():
    """A step's peak memory at vocab 131,072 grows from seq 64 to seq 2,048 by less than a third of one
    fp32 logits tensor (0.36 GB) beyond what the same growth costs at a small vocabulary."""
    def peak(T, V):
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, ROOT, str(T), str(V)], capture_output=True,
                             text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split()[-1])
    big = peak(2048, 131072) - peak(64, 131072)
    small = peak(2048, 512) - peak(64, 512)
    logits = 2048 * 131072 * 4
    assert big - small < logits / 3, (big / 1e9, small / 1e9)

def test_python_train_py_inside_an_sbatch_allocation_runs_as_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
           "SLURM_JOB_ID": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    env.pop("SLURM_STEP_NUM_TASKS", None)
    out = subprocess.run([sys.executable, "train.py", "configs/tiny.toml", *FAST, "--train.max_steps=1",
                          f"--train.out_dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    env.update(SLURM_STEP_NUM_TASKS="4", SLURM_PROCID="3")  # a task of srun, but no rendezvous address
    del env["MASTER_ADDR"]
    out = subprocess.run([sys.executable, "train.py", "configs/tiny.toml", *FAST, "--train.max_steps=1",
                          f"--train.out_dir={tmp_path / 'b'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "MASTER_ADDR" in out.stderr and "Traceback" not in out.stderr
