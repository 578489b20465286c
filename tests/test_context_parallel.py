"""Context parallelism (parallel.cp): the head-tail chunk map, K/V all-gather and gradient reduce-scatter,
positions, document masks and Goldfish on the whole sequence; whole runs on gloo against one process;
the long-context stages (init_from a checkpoint, the configs, their plan)."""
import dataclasses
import json
import os
import re
import subprocess

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import train_in_process
from test_parallel import ROOT, RUN, _init, _shutdown, _spawn, losses, torchrun

import checkpoint
import data
import model as model_py
import parallel
import plan
import train
from model import Apertus, ModelConfig, document_ids

# ----------------------------------------------------------------------------- the chunk map
@pytest.mark.parametrize("cp", [1, 2, 3, 4, 8])
def test_rank_r_holds_chunks_r_and_2cp_minus_1_minus_r_and_the_inverse_finds_them(cp):
    T = 2 * cp * 3
    chunks = torch.arange(T).view(2 * cp, 3)
    held = [parallel.cp_positions(T, cp, r) for r in range(cp)]
    for r, pos in enumerate(held):
        assert torch.equal(pos, torch.cat((chunks[r], chunks[2 * cp - 1 - r])))
        rank, index = parallel.cp_owner(pos, T, cp)
        assert (rank == r).all() and torch.equal(index, torch.arange(T // cp))
    assert torch.equal(torch.cat(held).sort().values, torch.arange(T))  # every position once
    # head-tail: every rank the same causal work (the keys its queries see)
    assert len({int((pos + 1).sum()) for pos in held}) == 1
    rank, index = parallel.cp_owner(torch.arange(T), T, cp)  # the inverse of every position
    assert torch.equal(torch.stack([held[r][i] for r, i in zip(rank, index)]), torch.arange(T))

# ----------------------------------------------------------------------------- C ranks simulated in one process
SMALL = ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, vocab_size=64, rope_theta=1e4, rope_scaling=None)

def packed_documents(B, T, seed=0, high=64):
    """[B, T + 1] ids: documents of 3 to 20 tokens, <s> ... </s>, packed back to back (several a row)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(3, high, (B, T + 1), generator=g)
    for b in range(B):
        at = 0
        while at < T + 1:
            n = int(torch.randint(3, 21, (), generator=g))
            rows[b, at] = 1
            if at + n - 1 < T + 1:
                rows[b, at + n - 1] = 2
            at += n
    return rows

def simulated_ranks(m, x, y, mask, cp, backend):
    """What each of cp ranks computes (logits and summed loss over its tokens), in one process: each rank's
    attention gets the whole sequence's K and V of the one-process forward, where the all-gather would
    bring them, after checking that its own K and V are those at its positions."""
    doc = document_ids(x, 2, 1)
    full_kv, per_rank = {}, []
    attns = [b.self_attn for b in m.model.layers.values()]

    def capture(i):
        def gather(k, v):
            full_kv[i] = (k, v)
            return k, v
        return gather
    for i, a in enumerate(attns):
        a.gather_kv = capture(i)
    m.attn_backend = backend
    with torch.no_grad():
        full_logits = m(x, doc_ids=doc)
        full_loss = m(x, y, loss_mask=mask, doc_ids=doc, reduction="sum")
        T = x.shape[1]
        for r in range(cp):
            pos = parallel.cp_positions(T, cp, r)

            def replay(i):
                def gather(k, v):  # this rank's rotated K and V are the sequence's at its positions
                    assert all(torch.allclose(a, b[:, pos], atol=1e-6) for a, b in zip((k, v), full_kv[i]))
                    return full_kv[i]
                return gather
            for i, a in enumerate(attns):
                a.gather_kv = replay(i)
            per_rank.append((pos, m(x, doc_ids=doc, cp_index=pos),
                             m(x, y, loss_mask=mask, doc_ids=doc, reduction="sum", cp_index=pos)))
    for a in attns:
        a.gather_kv = None
    return full_logits, full_loss, per_rank

@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("cp", [2, 4])
def test_global_positions_documents_and_mask_of_a_ranks_chunks_give_the_one_process_numbers(cp, backend):
    """Positions restart at each document start and a query sees exactly its one-process keys: each
    simulated rank's logits are the one-process logits at its positions (FlexAttention's block mask of
    local queries against every key on CPU too, forward only) and the ranks' losses add up to it."""
    m = Apertus(SMALL)
    m.init_weights(3)
    rows = packed_documents(2, 64)
    x, y = rows[:, :-1], rows[:, 1:]
    assert ((x == 1).sum(1) > 3).all()  # several documents a row
    mask = train.loss_mask(x, y, train.TrainConfig(goldfish_k=4, goldfish_h=6), 2)
    full_logits, full_loss, per_rank = simulated_ranks(m, x, y, mask, cp, backend)
    for pos, logits, _ in per_rank:
        assert (full_logits[:, pos] - logits).abs().max() < 1e-5
    assert abs(sum(loss for *_, loss in per_rank) - full_loss) < 1e-4 * full_loss

def test_goldfish_windows_across_another_ranks_chunk_count_as_in_one_process():
    """The Goldfish halo: the h labels that drop a position may lie in another rank's chunk. The mask is
    computed on the whole sequence, then sliced: a rank's dropped positions are the one-process ones,
    which its own labels alone could not give."""
    cp, h, k = 4, 6, 3
    m = Apertus(SMALL)
    m.init_weights(3)
    rows = packed_documents(2, 64, seed=1)
    x, y = rows[:, :-1], rows[:, 1:]
    t = train.TrainConfig(goldfish_k=k, goldfish_h=h)
    mask = train.loss_mask(x, y, t, 2)
    dropped = ~mask & (x != 2)
    halo = torch.zeros(64, dtype=torch.bool)  # the first h-1 positions of every chunk but the first
    for c in range(1, 2 * cp):
        halo[c * 8:c * 8 + h - 1] = True
    assert (dropped & halo).any()  # windows that cross into the previous chunk, held by another rank
    _, full_loss, per_rank = simulated_ranks(m, x, y, mask, cp, "sdpa")
    assert abs(sum(loss for *_, loss in per_rank) - full_loss) < 1e-4 * full_loss
    alone = [train.goldfish_mask(y[:, pos], k, h) for pos in (parallel.cp_positions(64, cp, r) for r in range(cp))]
    assert any(not torch.equal(a, train.goldfish_mask(y, k, h)[:, pos]) for a, pos in
               zip(alone, (parallel.cp_positions(64, cp, r) for r in range(cp))))

# ----------------------------------------------------------------------------- the collective pair, on gloo
def _pair_worker(rank, world, port):
    """cp = world ranks: (1) gather_kv against the one-process reorder, forward and, by the gradient of a
    loss every rank computes on the gathered K/V, backward (float64); (2) one block: one all-gather forward
    and one reduce-scatter backward, nothing else; (3) the plan's eager activation bytes against what
    autograd keeps on this CP rank."""
    _init(rank, world, port)
    grid = parallel.init_distributed(parallel.ParallelConfig(cp=world), "cpu")
    assert (grid.cp, grid.cp_rank, grid.dp) == (world, rank, 1)
    B, T, H, D = 2, 8 * world, 3, 4
    g = torch.Generator().manual_seed(0)  # the same full tensors and loss weights on every rank
    k_full, v_full = torch.randn(B, T, H, D, generator=g, dtype=torch.float64), torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    weights = torch.randn(world, 2, B, T, H, D, generator=g, dtype=torch.float64)
    ref = [t.clone().requires_grad_() for t in (k_full, v_full)]
    sum((w[0] * ref[0] + w[1] * ref[1] ** 2).sum() for w in weights).backward()  # every rank's loss, summed
    pos = parallel.cp_positions(T, world, rank)
    k, v = (t[:, pos].clone().requires_grad_() for t in (k_full, v_full))
    kg, vg = parallel.gather_kv(k, v, grid)
    assert torch.equal(kg, k_full) and torch.equal(vg, v_full)
    (weights[rank, 0] * kg + weights[rank, 1] * vg ** 2).sum().backward()
    assert torch.allclose(k.grad, ref[0].grad[:, pos], rtol=1e-12) and torch.allclose(v.grad, ref[1].grad[:, pos], rtol=1e-12)

    cfg = ModelConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, vocab_size=64, rope_scaling=None, rope_theta=1e4)
    m = Apertus(cfg)
    parallel.parallelize(m, grid)
    m.init_weights(0)
    block, (B, T) = m.model.layers["0"], (2, 256)
    pos = parallel.cp_positions(T, world, rank)
    x = torch.randn(B, T // world, 256, requires_grad=True)
    cos, sin = model_py.rope_cos_sin(m.inv_freq, pos.expand(B, -1), torch.float32)
    mask = model_py.sdpa_mask(torch.zeros(B, T, dtype=torch.int64), pos)
    kept, counts = {}, {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes(), tuple(t.shape)
        return t
    for name in ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor"):
        real = getattr(dist, name)
        setattr(dist, name, lambda *a, _real=real, _name=name, **kw: counts.update({_name: counts.get(_name, 0) + 1}) or _real(*a, **kw))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = block(x, cos, sin, mask)
    y.sum().backward()
    for name in counts:
        setattr(dist, name, getattr(torch.distributed.distributed_c10d, name))
    assert counts == {"all_gather_into_tensor": 1, "reduce_scatter_tensor": 1}, counts
    not_activations = {p.untyped_storage().data_ptr() for p in block.parameters()} | \
        {t.untyped_storage().data_ptr() for t in (cos, sin, mask)}
    # SDPA's CPU kernel keeps the bool mask as a float one [B, 1, T/cp, T]: a CPU artefact (on a GPU,
    # FlexAttention keeps the block mask, shared by the layers)
    measured = sum(n for ptr, (n, shape) in kept.items() if ptr not in not_activations and shape != (B, 1, T // world, T))
    measured /= B * T // world
    planned = plan.activation_bytes_per_token(cfg, 1, 1, 4, compiled=False, cp=world)
    assert measured <= planned <= measured + 4 * 256 + 64, (measured, planned)
    del y, kg, vg
    _shutdown(grid)

def test_kv_all_gather_and_gradient_reduce_scatter_one_pair_a_block_and_the_planned_activations():
    _spawn(_pair_worker, 2)

# ----------------------------------------------------------------------------- whole runs, against one process
# tests/test_parallel.py's run (tiny.toml, 8 steps of 16 x 128 tokens, a checkpoint at step 4) on documents
# of 5 to 62 random tokens (several a sequence), Goldfish on (k = h = 50), AdamW with eps 1e-8 and warmup 20
# at lr 1e-3, where tp = 2 and dp = 4 follow one process to 5e-5 in gradient norm (at tiny.toml's 3e-3 they
# drift apart by 1e-3 from step 7 on these random tokens, their losses still within 1e-5)
LAYOUTS = {"dp2": (1, 2, 1, 2), "cp4": (1, 4, 1, 1), "tp2sp": (2, 2, 1, 1), "pp2": (1, 2, 2, 1)}  # (tp, cp, pp, dp)

def layout_args(tp, cp, pp, sp=False):
    return [f"--parallel.tp={tp}", f"--parallel.cp={cp}", f"--parallel.pp={pp}", f"--parallel.sequence_parallel={str(sp).lower()}"]

@pytest.fixture(scope="module")
def short_documents(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("short") / "docs"
    rng = np.random.default_rng(0)
    with data.IndexedDatasetWriter(str(prefix), np.uint16) as w:
        for _ in range(1200):
            w.add_document(np.concatenate([[1], rng.integers(3, 260, rng.integers(3, 61)), [2]]))
    return [f"--data.dataset={prefix}", "--train.lr=1e-3"]  # beside test_parallel.RUN, which torchrun() adds

@pytest.fixture(scope="module")
def cp_runs(tmp_path_factory, short_documents):
    """One process, then the 4 processes of every layout."""
    base = tmp_path_factory.mktemp("cp_runs")
    out = train_in_process(*RUN, *short_documents, f"--train.out_dir={base / 'single'}", threads=1)
    assert out.returncode == 0, out.stderr[-3000:]
    for name, (tp, cp, pp, dp) in LAYOUTS.items():
        # (1, 2, 2, 1) recomputes each block in backward, as the 70B stages do: its K/V all-gather runs again
        ac = [f"--train.activation_checkpointing={str(name == 'pp2').lower()}"]
        out = torchrun(4, base / name, *short_documents, *layout_args(tp, cp, pp, name == "tp2sp"), *ac)
        assert out.returncode == 0, (name, f"whole output in {base / name}.log", out.stderr[-3000:])
        assert f"layout tp={tp} cp={cp} pp={pp} dp={dp}" in out.stdout
    return base

@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_4_processes_with_context_parallelism_give_the_single_process_losses(cp_runs, layout):
    # the gradient norm sums in another order and follows AdamW's first steps, which amplify the rounding of
    # gradients near 0: up to 8e-5 here (and 4e-5 at dp = 4 without CP)
    for key, rtol in (("loss", 1e-5), ("grad_norm", 3e-4), ("val_loss", 1e-5)):
        want, got = ({r["step"]: r[key] for r in map(json.loads, open(cp_runs / run / "metrics.jsonl")) if key in r}
                     for run in ("single", layout))
        assert sorted(got) == (list(range(1, 9)) if key != "val_loss" else [8])
        for step, value in got.items():
            assert abs(value - want[step]) <= rtol * abs(want[step]), (key, step, value, want[step])

def test_a_cp_checkpoint_holds_the_one_process_weights_and_one_without_cp_reads_as_cp1(cp_runs, tmp_path):
    """The reader maps pieces to rank files by the writer's (tp, cp, pp, dp): the cp = 2 x pp = 2
    checkpoint holds the one-process weights (to AdamW's first steps on gradients near 0, whose sign is
    rounding: 1e-4 at lr 1e-3; a piece read from the wrong file is off by the init's 0.009). A checkpoint
    from before context parallelism (no cp in its layout) is read as cp = 1."""
    old = tmp_path / "ckpt-00000004"
    subprocess.run(["cp", "-r", str(cp_runs / "single" / "ckpt-00000004"), str(old)], check=True)
    meta = json.loads((old / "meta.json").read_text())
    assert meta["layout"].pop("cp") == 1
    (old / "meta.json").write_text(json.dumps(meta))
    single, pp2 = checkpoint.CheckpointReader(str(old)), checkpoint.CheckpointReader(str(cp_runs / "pp2" / "ckpt-00000004"))
    assert (single.cp, pp2.cp, pp2.pp) == (1, 2, 2)
    for name in single.shapes:
        assert torch.allclose(single.full("master", name), pp2.full("master", name), atol=5e-4, rtol=0), name

# cp = 2 x pp = 2 -> one process (cp = 1, pp = 1); tp = 2 x cp = 2 with sequence parallelism -> cp = 4 (tp = 1)
@pytest.mark.parametrize("source,nproc,layout", [("pp2", 1, None), ("tp2sp", 4, (1, 4, 1))])
def test_a_cp2_checkpoint_resumes_at_cp1_and_cp4_under_another_tp_and_pp(cp_runs, short_documents, tmp_path, source,
                                                                         nproc, layout):
    subprocess.run(["cp", "-r", str(cp_runs / source / "ckpt-00000004"), str(tmp_path)], check=True)
    if layout is None:
        out = train_in_process(*RUN, *short_documents, f"--train.out_dir={tmp_path}", threads=1)
    else:
        out = torchrun(nproc, tmp_path, *short_documents, *layout_args(*layout))
    assert out.returncode == 0, (f"whole output in {tmp_path}.log", out.stderr[-3000:])
    assert "resumed from" in out.stdout
    # each rank reads its share of the checkpoint: at most 1/world of it
    per_rank = float(re.search(r"read [\d.]+ to ([\d.]+) MB per rank", out.stdout).group(1))
    size = sum(os.path.getsize(f) for f in (cp_runs / source / "ckpt-00000004").glob("rank-*.safetensors")) / 1e6
    assert per_rank <= 1.1 * size / nproc, (per_rank, size)
    want, got = losses(cp_runs / "single"), losses(tmp_path)
    assert sorted(got) == [5, 6, 7, 8]
    for step, loss in got.items():
        assert abs(loss - want[step]) <= 1e-5 * abs(want[step]), (step, loss, want[step])

def test_a_context_parallel_layout_that_does_not_fit_is_refused(monkeypatch, capsys):
    """One line, before any process group or tensor exists (this process plays rank 0 of the world)."""
    monkeypatch.chdir(ROOT)
    for nproc, args, message in (
            (4, ["--parallel.cp=3", "--data.seq_len=132"], "world size 4 is not divisible by tp x cp x pp = 1 x 3 x 1"),
            (4, ["--parallel.cp=4", "--data.seq_len=100"], "context parallelism needs seq_len 100 divisible by 2 x cp = 8"),
            (8, ["--parallel.cp=2", "--parallel.tp=4", "--parallel.sequence_parallel=true", "--data.seq_len=132"],
             "sequence parallelism needs seq_len 132 divisible by cp x tp = 8"),
            (1, ["--parallel.cp=0"], "tp=1, cp=0 and pp=1 must be at least 1")):
        for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1").items():
            monkeypatch.setenv(k, v)
        assert train.main([*RUN, *args]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"error: layout refused: {message}"]
    assert not dist.is_initialized()

# ----------------------------------------------------------------------------- the long-context stages
def test_a_stage_starts_from_a_checkpoints_weights_with_its_own_rope_and_exports_the_released_rope(cp_runs, tmp_path,
                                                                                                     capsys):
    """init_from a checkpoint of another layout (cp = 2 x dp = 2): its weights only (a zero-lr step exports
    them exactly), a fresh optimizer at step 0, RoPE from the config file (here the released models':
    theta 12,000,000 and llama3 scaling); any other [model] key that differs is one line of error."""
    transformers = pytest.importorskip("transformers")
    source = cp_runs / "dp2" / "ckpt-00000008"
    rope = ['--model.rope_theta=12000000.0', '--model.rope_scaling={rope_type="llama3",factor=8.0,'
            'original_max_position_embeddings=8192,low_freq_factor=1.0,high_freq_factor=4.0}', "--model.max_position_embeddings=65536"]
    out = train_in_process(*RUN, "--train.max_steps=1", "--train.lr=0", "--train.export_hf=true", f"--train.init_from={source}",
                           f"--train.out_dir={tmp_path / 'stage'}", *rope)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"initialised from {source}" in out.stdout
    meta = json.loads((tmp_path / "stage" / "ckpt-00000001" / "meta.json").read_text())
    assert meta["step"] == meta["optimizer_steps"] == 1  # step 0 and a new optimizer: not the source's 8
    hf = json.loads((tmp_path / "stage" / "hf" / "config.json").read_text())
    released = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    assert (hf["rope_theta"], hf["rope_scaling"], hf["max_position_embeddings"]) == (12_000_000.0, released, 65536)
    assert transformers.AutoConfig.from_pretrained(tmp_path / "stage" / "hf").rope_scaling["rope_type"] == "llama3"
    ck, got = checkpoint.CheckpointReader(str(source)), checkpoint.load_hf(tmp_path / "stage" / "hf")
    for name, p in got.named_parameters():
        assert torch.equal(p, ck.full("master", name)), name
    argv = [*RUN, f"--train.init_from={source}", f"--train.out_dir={tmp_path / 'x'}", "--model.num_hidden_layers=2"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"error: model.num_hidden_layers = 2 disagrees with 4 in {source}/meta.json"]

STAGE_TABLE = {  # APERTUS.md 2b: sequence, RoPE theta, (tp, cp, pp, dp)
    "8b": [(8192, 1e6, (2, 1, 1, 1024)), (16384, 2e6, (4, 1, 1, 512)), (32768, 4e6, (4, 2, 1, 256)), (65536, 12e6, (4, 4, 1, 128))],
    "70b": [(8192, 1e6, (4, 1, 8, 64)), (16384, 2e6, (4, 2, 8, 32)), (32768, 4e6, (4, 4, 8, 16)), (65536, 12e6, (4, 8, 8, 8))]}

@pytest.mark.parametrize("size", list(STAGE_TABLE))
def test_the_stage_configs_follow_the_table_chain_their_checkpoints_and_the_64k_plan_fits_an_h100(size, capsys):
    pre = train.load_config(os.path.join(ROOT, f"configs/apertus-{size}.toml"))
    previous = f"{pre['train'].out_dir}/ckpt-{pre['train'].max_steps:08d}"  # the end of pretraining
    tokens = {"8b": 2**23, "70b": 2**24}[size]
    for (seq, theta, (tp, cp, pp, dp)), name in zip(STAGE_TABLE[size], ("8k", "16k", "32k", "64k")):
        path = os.path.join(ROOT, f"configs/apertus-{size}-{name}.toml")
        cfg = train.load_config(path)
        m, t, p = cfg["model"], cfg["train"], cfg["parallel"]
        assert (cfg["data"].seq_len, m.rope_theta, (p.tp, p.cp, p.pp, p.dp)) == (seq, theta, (tp, cp, pp, dp))
        assert {k: v for k, v in vars(m).items() if k != "rope_theta"} == \
            {k: v for k, v in vars(pre["model"]).items() if k != "rope_theta"}  # the shapes: RoPE alone changes
        assert t.global_batch_size * seq == tokens and t.lr == t.min_lr == pre["train"].min_lr and t.decay_steps == 0
        assert abs(t.warmup_steps * tokens - 1.2e9) <= tokens / 2 and t.goldfish and t.init_from == previous
        assert {s.get("min_doc_tokens") for s in cfg["data"].sources} == {None, 4096}
        previous = f"{t.out_dir}/ckpt-{t.max_steps:08d}"
    hf = checkpoint.config_to_hf(m, torch.bfloat16)  # what the 64k stage's export writes: the released RoPE
    assert (hf["rope_theta"], hf["rope_scaling"]["rope_type"], hf["rope_scaling"]["factor"], hf["max_position_embeddings"]) \
        == (12_000_000.0, "llama3", 8.0, 65536) and t.export_hf
    plan_ = plan.plan_layout(plan.load(path, []))
    peaks = [peak for (ckpt, _), (_, peak) in plan_["stages"].items() if ckpt == t.activation_checkpointing]
    assert plan_["gpus"] == 2048 and all(peak < 0.9 * 80e9 for peak in peaks), peaks
    # ZeRO-1 partitions over dp x cp: the optimizer's share is that of cp = 1 at dp x cp data-parallel ranks
    same = {**cfg, "parallel": dataclasses.replace(p, cp=1, dp=cp * dp)}
    key = "fp32 master + optimizer moments"
    assert plan.memory_plan(cfg, tp, dp)[0][key] == plan.memory_plan(same, tp, cp * dp)[0][key]
    assert plan.main([path]) == 0
    assert f"layout tp={tp} cp={cp} pp={pp} dp={dp} (2048 GPUs)" in capsys.readouterr().out
