"""Tensor and data parallelism on CPU: real processes on gloo, checked against one process."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import train_in_process

import model as model_py
import parallel
import plan
from model import Apertus, ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
RUN = ["configs/tiny.toml", "--train.log_interval=1", "--train.sample_tokens=0", "--train.eval_interval=0",
       "--train.max_steps=8", "--train.checkpoint_interval=4", "--parallel.bucket_size=60000", "--data.seq_len=128"]

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def _spawn(fn, world, *args):
    port = free_port()
    mp.spawn(fn, args=(world, port, *args), nprocs=world, join=True)

def _init(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)

def _shutdown(grid, opt=None):
    """parallel.shutdown and what it promises: no gloo thread outlives it. One left running can free a
    collective's tensors while the interpreter exits, and that aborts the process at random."""
    assert parallel.gloo_threads() != [] or sys.platform != "linux"
    parallel.shutdown(grid, opt)
    assert parallel.gloo_threads() == []

# ----------------------------------------------------------------------------- layers
def _layers_worker(rank, world, port, sp):
    _init(rank, world, port)
    grid = parallel.init_distributed(parallel.ParallelConfig(tp=world, sequence_parallel=sp), "cpu")
    torch.manual_seed(0)  # the same full tensors on every rank
    B, T, d, out, V = 2, 8, 12, 16, 24
    x = torch.randn(B, T, d)
    W1, W2, E = torch.randn(out, d), torch.randn(d, out), torch.randn(V, d)
    ids, targets = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.2
    # single-process reference: embedding -> column -> row -> head -> cross-entropy
    ref = [t.clone().requires_grad_() for t in (W1, W2, E)]
    h = F.embedding(ids, ref[2]) + x
    y = F.linear(F.linear(h, ref[0]), ref[1])
    logits = F.linear(y, ref[2])
    want = (F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(B, T) * mask).sum()
    want.backward()

    emb_full = torch.nn.Embedding(V, d)
    emb_full.weight.role = model_py.Role("normal", True)
    col = parallel.ColumnParallelLinear(model_py.linear(d, out), grid)
    row = parallel.RowParallelLinear(model_py.linear(out, d), grid)
    emb = parallel.VocabParallelEmbedding(emb_full, grid)
    head = parallel.ColumnParallelLinear(model_py.linear(d, V), grid)
    with torch.no_grad():
        for mod, full in ((col, W1), (row, W2), (emb, E), (head, E)):
            mod.weight.copy_(parallel.tp_slice(full, mod.weight.role, grid))
    seq = (lambda t: t.chunk(world, 1)[rank]) if sp else (lambda t: t)
    h = emb(ids) + seq(x)
    y = row(col(h))
    with torch.no_grad():
        assert head(y).shape == (B, T, V // world)  # the full logits never exist on one rank
    got = parallel.vocab_parallel_loss(grid)(y, head, targets, mask)
    got.backward()
    assert torch.allclose(got, want, rtol=1e-5), (got, want)
    for mod, full in ((col, ref[0]), (row, ref[1])):
        assert torch.allclose(mod.weight.grad, parallel.tp_slice(full.grad, mod.weight.role, grid), atol=1e-4, rtol=1e-4)
    # the embedding matrix is used twice in the reference (tied here for the test): sum both slices
    assert torch.allclose(emb.weight.grad + head.weight.grad, parallel.tp_slice(ref[2].grad, emb.weight.role, grid),
                          atol=1e-4, rtol=1e-4)
    del h, y, got  # their autograd graphs hold the tensor-parallel group
    _shutdown(grid)

@pytest.mark.parametrize("world,sp", [(2, False), (4, False), (4, True)])
def test_parallel_layers_match_single_process(world, sp):
    _spawn(_layers_worker, world, sp)

class SGD:
    """Plain SGD with the optimizer interface of train.AdEMAMix (steps, moments, step(lr))."""
    def __init__(self, roles, params):
        self.params, self.steps = params, 0

    def moments(self, i):
        return {}

    @torch.no_grad()
    def step(self, lr):
        self.steps += 1
        torch._foreach_add_(self.params, [p.grad for p in self.params], alpha=-lr)

def _model_worker(rank, world, port, tp, sp, opt_name):
    """Whole model steps under (tp, dp) against the same steps on one process. SGD checks the gradients
    tightly (AdEMAMix's first steps are nearly sign(g), blind to a gradient's size); AdEMAMix checks the
    optimizer state partitioned over data-parallel ranks, with a tolerance far below one update (lr)."""
    _init(rank, world, port)
    import train
    grid = parallel.init_distributed(parallel.ParallelConfig(tp=tp, sequence_parallel=sp), "cpu")
    cfg = ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, head_dim=8, vocab_size=64, rope_theta=1e4, rope_scaling=None)
    t = train.TrainConfig(optimizer="ademamix", ademamix_warmup=10, weight_decay=0.1)

    def build(g):
        with torch.device("meta"):
            m = Apertus(cfg)
        parallel.parallelize(m, g)
        m.to_empty(device="cpu")
        m.init_weights(5, lambda role, full: parallel.tp_slice(full, role, g))
        return m
    torch.manual_seed(1)
    ids = torch.randint(3, 64, (4, 17))  # 16 inputs: divisible by tp for sequence parallelism
    ids[:, 7] = 2  # documents
    from model import document_ids
    single_grid = parallel.Grid()
    ref = build(single_grid)
    make = SGD if opt_name == "sgd" else train.make_optimizer(t)
    ref_opt = parallel.DistributedOptimizer(ref, single_grid, make)
    model = build(grid)
    opt = parallel.DistributedOptimizer(model, grid, make, bucket_size=3000)
    lr, atol = (0.5, 1e-6) if opt_name == "sgd" else (1e-2, 2e-4)
    # every parameter view, master piece and gradient view starts 16-byte aligned (Inductor's assumption)
    views = [p for p in model.parameters()] + opt.masters + [m.grad for m in opt.masters]
    assert all(v.data_ptr() % 16 == 0 for v in views)
    assert all(opt.index[n][0] % parallel.ALIGN == 0 for n in opt.index)
    mine = slice(grid.dp_rank * 4 // grid.dp, (grid.dp_rank + 1) * 4 // grid.dp)
    for step in range(3):
        for m, o, rows in ((ref, ref_opt, slice(None)), (model, opt, mine)):
            x, y = ids[rows, :-1], ids[rows, 1:]
            loss = m(x, y, doc_ids=document_ids(x, 2), reduction="sum") / (4 * 16)
            loss.backward()
            o.step(lr, clip=0.5)
        if grid.dp > 1 and len(opt.buckets) > 1:
            # the all-gathers run on after the step; the embedding waits only for its own bucket(s)
            assert all(b.gather_work is not None for b in opt.buckets)
            model.model.embed_tokens(ids[:1, :4])
            emb_buckets = {opt.index[n][1] for n in opt.index if n.startswith("model.embed_tokens")}
            assert all((b.gather_work is None) == (i in emb_buckets) for i, b in enumerate(opt.buckets))
    opt.wait_params()
    full = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        want = parallel.tp_slice(full[name], p.role, grid)
        assert torch.allclose(p, want, atol=atol, rtol=0), (name, (p - want).abs().max())
    assert parallel.check_replicas(model, grid) == []
    del loss  # its autograd graph holds the tensor-parallel group
    _shutdown(grid, opt)

def _collectives_worker(rank, world, port, sp):
    """Count the collectives of one block's forward and backward under TP."""
    _init(rank, world, port)
    grid = parallel.init_distributed(parallel.ParallelConfig(tp=world, sequence_parallel=sp), "cpu")
    cfg = ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, vocab_size=64, rope_theta=1e4, rope_scaling=None)
    with torch.device("meta"):
        m = Apertus(cfg)
    parallel.parallelize(m, grid)
    m.to_empty(device="cpu")
    m.init_weights(0, lambda role, full: parallel.tp_slice(full, role, grid))
    block = m.model.layers["0"]
    B, T = 2, 16
    x = torch.randn(B, T // world if sp else T, 32, requires_grad=True)
    cos, sin = model_py.rope_cos_sin(m.inv_freq, torch.arange(T).expand(B, T), torch.float32)
    counts = {}
    for name in ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor"):
        real = getattr(dist, name)
        setattr(dist, name, lambda *a, _real=real, _name=name, **k: counts.update({_name: counts.get(_name, 0) + 1}) or _real(*a, **k))
    block(x, cos, sin).sum().backward()
    for name in counts:
        setattr(dist, name, getattr(torch.distributed.distributed_c10d, name))
    # Megatron-LM's count: one collective per sublayer forward and one backward
    want = {"all_gather_into_tensor": 4, "reduce_scatter_tensor": 4} if sp else {"all_reduce": 4}
    assert counts == want, counts
    _shutdown(grid)

@pytest.mark.parametrize("sp", [False, True])
def test_a_block_sends_four_collectives_as_megatron(sp):
    _spawn(_collectives_worker, 2, sp)

@pytest.mark.parametrize("tp,sp,opt", [(2, False, "sgd"), (2, True, "sgd"), (4, True, "sgd"), (2, False, "ademamix"),
                                       (1, False, "ademamix")])
def test_optimizer_steps_match_single_process_and_replicas_agree(tp, sp, opt):
    _spawn(_model_worker, 4, tp, sp, opt)

# ----------------------------------------------------------------------------- whole runs
def torchrun(nproc, out_dir, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "train.py", *RUN, f"--train.out_dir={out_dir}", *args]
    out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    # the whole output beside the run's directory: a worker's last words are often past the tail an assert shows
    with open(f"{out_dir}.log", "w") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\nexit status {out.returncode}\n{out.stdout}\n{out.stderr}")
    assert "threads outlive the process groups" not in out.stderr, out.stderr[-3000:]
    return out

def losses(out_dir, key="loss"):
    return {r["step"]: r[key] for r in map(json.loads, open(os.path.join(out_dir, "metrics.jsonl")))}

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "tp4": (4, 1), "pp2": (1, 2), "tp2pp2": (2, 2), "pp4": (1, 4)}  # (tp, pp)

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny config for 8 steps on one process and on 4 processes under every layout."""
    base = tmp_path_factory.mktemp("runs")
    out = train_in_process(*RUN, f"--train.out_dir={base / 'single'}")
    assert out.returncode == 0, out.stderr[-3000:]
    for name, (tp, pp) in LAYOUTS.items():
        out = torchrun(4, base / name, f"--parallel.tp={tp}", f"--parallel.pp={pp}")
        assert out.returncode == 0, (name, f"whole output in {base / name}.log", out.stderr[-3000:])
    return base

@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_4_processes_give_the_single_process_losses(runs, layout):
    # the norm: clipping sees every stage, each element counted once (summed in another order: looser)
    for key, rtol in (("loss", 1e-5), ("grad_norm", 1e-4)):
        want, got = losses(runs / "single", key), losses(runs / layout, key)
        assert sorted(got) == list(range(1, 9))
        for step, value in got.items():
            assert abs(value - want[step]) <= rtol * abs(want[step]), (key, step, value, want[step])

# pp4 -> tp2pp2: a checkpoint written at tp = 1 split nothing, and the reader must still find its slices
@pytest.mark.parametrize("source,tp,pp", [("pp4", 2, 2), ("tp2pp2", 1, 4), ("tp2pp2", 2, 1), ("tp2pp2", None, None)])
def test_a_checkpoint_resumes_under_another_layout(runs, tmp_path, source, tp, pp):
    subprocess.run(["cp", "-r", str(runs / source / "ckpt-00000004"), str(tmp_path)], check=True)
    if tp is None:  # one process
        out = train_in_process(*RUN, f"--train.out_dir={tmp_path}")
    else:
        out = torchrun(4, tmp_path, f"--parallel.tp={tp}", f"--parallel.pp={pp}")
    assert out.returncode == 0, (f"whole output in {tmp_path}.log", out.stderr[-3000:])
    assert "resumed from" in out.stdout
    # each rank reads its share of the checkpoint, not every full tensor: at most 1/world of it (plus the
    # small tensors replicated over TP, which every TP rank reads whole)
    import re
    per_rank, total = map(float, re.search(r"read [\d.]+ to ([\d.]+) MB per rank, ([\d.]+) MB in all", out.stdout).groups())
    size = sum(os.path.getsize(f) for f in (runs / source / "ckpt-00000004").glob("rank-*.safetensors")) / 1e6
    world = 1 if tp is None else 4
    assert per_rank <= 1.1 * size / world and total <= 1.05 * size, (per_rank, total, size)
    want, got = losses(runs / "single"), losses(tmp_path)
    assert sorted(got) == [5, 6, 7, 8]
    for step, loss in got.items():
        assert abs(loss - want[step]) <= 1e-5 * abs(want[step]), (step, loss, want[step])

def test_a_resume_reads_only_its_share_of_the_bytes(runs, monkeypatch):
    """Counted where the bytes leave safetensors, and the files opened: each rank of a tp=4 reader of a
    (tp=2, dp=2) checkpoint reads a quarter of it (plus the small tensors replicated over TP) and opens
    only the files of the writer's tensor-parallel rank that holds its slices (plus tp_rank 0's, which
    hold the replicated tensors)."""
    import checkpoint
    import train
    real, opened, nbytes = checkpoint.safe_open, set(), [0]

    class Counted:  # safe_open, counting what each read returns
        def __init__(self, path, framework):
            self.f, self.name = real(path, framework), os.path.basename(path)
            opened.add(self.name)

        def get_slice(self, key):
            sl = self.f.get_slice(key)
            return type("Slice", (), {"__getitem__": lambda _, i: count(sl[i]), "get_shape": lambda _: sl.get_shape()})()

        def get_tensor(self, key):
            return count(self.f.get_tensor(key))

        def keys(self):
            return self.f.keys()

    def count(t):
        nbytes[0] += t.numel() * t.element_size()
        return t
    monkeypatch.setattr(checkpoint, "safe_open", Counted)
    path = runs / "tp2" / "ckpt-00000004"  # written by tp=2 x dp=2: ranks 0, 2 hold tp_rank 0, ranks 1, 3 tp_rank 1
    size = sum(os.path.getsize(f) for f in path.glob("rank-*.safetensors"))
    cfg = train.load_config(os.path.join(ROOT, RUN[0]), RUN[1:] + ["--parallel.tp=4"])
    total = 0
    for tp_rank in range(4):  # one rank of a tp=4 layout at a time, in this process
        grid = parallel.Grid(tp=4, tp_rank=tp_rank)
        opt = parallel.DistributedOptimizer(train.build(cfg, grid, grid.device), grid, train.make_optimizer(cfg["train"]))
        opened.clear()
        nbytes[0] = 0
        checkpoint.load_checkpoint(str(path), opt, grid, cfg["train"].optimizer)
        holder = {"rank-00000.safetensors", "rank-00002.safetensors"}  # writer tp_rank 0, both dp ranks
        if tp_rank >= 2:
            holder |= {"rank-00001.safetensors", "rank-00003.safetensors"}
        assert opened == holder, (tp_rank, opened)
        assert nbytes[0] <= 1.1 * size / 4, (tp_rank, nbytes[0], size)
        total += nbytes[0]
    assert total <= 1.1 * size, (total, size)

def test_pipeline_logs_its_bubble(runs):
    rows = [json.loads(line) for line in open(runs / "pp4" / "metrics.jsonl")]
    assert all(0 <= r["bubble"] < 1 for r in rows)

def test_consolidate_tp2_dp2_checkpoint_to_hugging_face(runs, tmp_path):
    transformers = pytest.importorskip("transformers")
    import checkpoint
    out = subprocess.run([sys.executable, "checkpoint.py", "consolidate", str(runs / "tp2" / "ckpt-00000008"),
                          str(tmp_path / "hf")], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    ck = checkpoint.CheckpointReader(str(runs / "tp1" / "ckpt-00000008"))  # same run, other layout
    ours = checkpoint.load_hf(tmp_path / "hf")
    for name, p in ours.named_parameters():
        assert torch.allclose(p, ck.full("master", name).to(torch.bfloat16).float(), atol=1e-2), name
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(4, 260, (1, 32))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours.eval()(ids), atol=1e-4)

def test_a_layout_that_does_not_fit_is_refused(monkeypatch, capsys):
    """Refused before any process group or tensor exists: the check needs only the world size (set here
    as torchrun would set it for rank 0), so this process plays rank 0 and no worker is started."""
    import train
    monkeypatch.chdir(ROOT)
    for nproc, args, message in ((3, ["--parallel.tp=2"], "layout refused: world size 3 is not divisible by tp x cp x pp = 2 x 1 x 1"),
                                 (3, ["--parallel.pp=3"], "layout refused: pp=3 does not divide the 4 layers"),
                                 (3, ["--parallel.pp=2"], "layout refused: world size 3 is not divisible by tp x cp x pp = 1 x 1 x 2"),
                                 (1, ["--parallel.pp=0"], "layout refused: tp=1, cp=1 and pp=0 must be at least 1"),
                                 (1, ["--plan", "--parallel.tp=8"], "tp=8 does not divide the KV heads (4)")):
        for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1").items():
            monkeypatch.setenv(k, v)
        assert train.main([*RUN, *args]) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines() == [f"error: {message}"] or (args[0] == "--plan" and message in err), err
    assert not dist.is_initialized()

def test_plan_70b_at_apertus_layout_fits_gh200_and_h100():
    out = subprocess.run([sys.executable, "plan.py", "configs/apertus-70b.toml", "--parallel.tp=4",
                          "--parallel.pp=8", "--parallel.dp=128", "--train.activation_checkpointing=true"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "tp=4 pp=8 dp=128" in out.stdout
    with_ckpt = out.stdout.split("with activation checkpointing:")[1]
    peaks = [line for line in with_ckpt.splitlines() if "peak" in line]
    assert len(peaks) == 2 and all("fits GH200 96 GB, fits H100 80 GB" in line for line in peaks)

def _stage_worker(rank, world, port):
    """pp = 4: each stage holds only its layers, and 1F1B keeps no more activations alive than the plan's
    micro-batches in flight, counted in bytes as autograd saves and frees them, for m = 8 and m = 2."""
    _init(rank, world, port)
    import functools
    import train
    cfg = train.load_config(os.path.join(ROOT, "configs/tiny.toml"), ["--parallel.pp=4", "--train.global_batch_size=8",
                                                                      "--train.micro_batch_size=1"])
    grid = parallel.init_distributed(cfg["parallel"], "cpu")
    model = train.build(cfg, grid, grid.device)
    names = {n for n, _ in model.named_parameters()}
    layers = {n.split(".")[2] for n in names if n.startswith("model.layers.")}
    assert layers == {str(grid.pp_rank)}
    assert ("model.embed_tokens.weight" in names) == (grid.pp_rank == 0)
    assert ("lm_head.weight" in names) == ("model.norm.weight" in names) == (grid.pp_rank == 3)
    opt = parallel.DistributedOptimizer(model, grid, train.make_optimizer(cfg["train"]))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    alive = {"now": 0, "peak": 0}

    class Saved:  # one tensor autograd keeps for backward, counted while it lives
        def __init__(self, t):
            self.t, self.n = t, 0 if t.untyped_storage().data_ptr() in weights else t.numel() * t.element_size()
            alive["now"] += self.n
            alive["peak"] = max(alive["peak"], alive["now"])

        def __del__(self):
            alive["now"] -= self.n
    hooks = torch.autograd.graph.saved_tensors_hooks(Saved, lambda s: s.t)
    x = torch.randint(4, 260, (8, 257))
    mask = torch.ones(1, 256, dtype=torch.bool)
    step = functools.partial(train.micro_loss, model, x[:1, :-1], x[:1, 1:], mask, 256.0)
    with hooks:  # one micro-batch's forward alone: what one micro-batch in flight costs on this stage
        out = step(None if grid.first_stage else torch.randn(1, 256, 128, requires_grad=True))
    one = alive["now"]
    opt.sync = False  # a backward that only frees what the forward saved (its gradients are dropped)
    out.backward(None if grid.last_stage else torch.zeros_like(out))
    opt.zero_grads()
    assert alive["now"] == 0 and one > 0
    for m in (8, 2):
        steps = [functools.partial(train.micro_loss, model, x[i:i + 1, :-1], x[i:i + 1, 1:], mask, m * 256.0)
                 for i in range(m)]
        pipe = parallel.Pipe(grid, (1, 256, 128), torch.float32)
        alive["peak"] = 0
        with hooks:
            _, held = parallel.pipeline_1f1b(steps, pipe, opt)
        planned = min(4 - grid.pp_rank, m)
        cfg_m = train.load_config(os.path.join(ROOT, "configs/tiny.toml"), [
            "--parallel.pp=4", f"--train.global_batch_size={m}", "--train.micro_batch_size=1"])
        assert any(k.startswith("activations (%d micro-batch" % planned) for k in plan.memory_plan(cfg_m, 1, 1, grid.pp_rank)[0])
        assert held == planned and alive["peak"] == planned * one, (m, grid.pp_rank, alive["peak"] / one, planned)
        assert alive["now"] == 0
        opt.step(1e-3)
    _shutdown(grid, opt)

def test_a_stage_holds_its_layers_and_no_more_activations_than_planned():
    _spawn(_stage_worker, 4)

def test_slurm_environment_gives_the_rank(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "8")  # the batch script of an 8-task allocation, not a task of srun
    monkeypatch.setenv("SLURM_LOCALID", "0")
    assert parallel.env_rank() == (0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "5")   # a task that srun started
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert parallel.env_rank() == (5, 8, 1)
