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
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--train.log_interval=1", "--train.sample_tokens=0", "--train.eval_interval=0"]


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "2"})


# ----------------------------------------------------------------------------- Goldfish
def goldfish_reference(labels, k=50, h=50):
    """APERTUS.md, literally: one sequence at a time."""
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
def test_bad_config_is_one_clear_line(args, message, tmp_path):
    out = cli(*args, f"--train.out_dir={tmp_path}", timeout=120)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


# ----------------------------------------------------------------------------- the loop
def metrics(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["step"]: r for r in rows}


def test_resume_is_bit_identical(tmp_path):
    args = ["configs/tiny.toml", *FAST, "--train.checkpoint_interval=3"]
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
    out = cli("configs/tiny.toml", "--train.max_steps=60", "--train.eval_interval=0", "--train.warmup_steps=10",
              "--train.decay_steps=20", "--train.sample_tokens=40", f"--train.out_dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    val = metrics(tmp_path)[60]["val_loss"]
    assert val < 0.6 * math.log(260), val  # untrained: about ln(vocab) = 5.6
    assert "sample:" in out.stdout
