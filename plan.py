"""The plan of a layout, from the config alone (nothing is allocated): what one GPU holds at its peak,
what one training step hands to torch.distributed, and how long the step takes on a given machine.

    python plan.py configs/apertus-70b.toml --parallel.tp=4 --parallel.pp=8 --parallel.dp=128
    python plan.py configs/apertus-8b-sft.toml                          # the layout of the config's [parallel]
    python plan.py configs/apertus-70b.toml --audit        # parameters by component, FLOPs per token, size
    python plan.py configs/apertus-70b.toml --train.global_batch_size=4096 --machine gh200-alps --gpus 4096
    python plan.py configs/apertus-70b.toml --machine gh200-alps --gpus 4096 --machine.net_GBps=50  # what if
    python plan.py configs/tiny.toml --parallel.tp=2 --parallel.dp=2 --bytes      # one step's collectives
    python plan.py configs/apertus-70b.toml --train.global_batch_size=4096 --machine gh200-alps --gpus 4096 --search
    python plan.py configs/apertus-70b.toml --train.global_batch_size=4096 --machine gh200-alps --gpus 4096 --scaling

Every key of the config can be overridden as in train.py (--section.key=value); parallel.dp, which a run
takes from the world size, sets the data-parallel degree here (--gpus N sets it to N / (tp x pp)).
Memory: `plan_layout` returns the numbers (per stage, with and without activation checkpointing),
`format_plan` prints them. Bytes: `step_bytes`, per collective kind and group. Time: `step_time`, a sum
of named terms (each a few lines below with its formula), on a machine of MACHINES (each number
overridable: --machine.KEY=VALUE) at a compute efficiency measured on a GPU (EFFICIENCY; --efficiency
FILE adds bench.py's rows); `format_time` prints it. `--search` ranks the layouts that fit, `--scaling`
prints the strong-scaling curve. `python train.py CONFIG --plan ...` is the same command.
"""
import argparse
import itertools
import json
import math
import sys
from dataclasses import fields, replace

import torch

import checkpoint
import model as model_py
import parallel
import train
from model import flops_per_token, param_count

GPUS = (("GH200 96 GB", 96e9), ("H100 80 GB", 80e9))  # "fits": under 90% of the GPU's memory
FIT = 0.9  # leaving room for the allocator's fragmentation
_CACHE = {}  # param_count, the stages' parameters and buckets, once per architecture and layout (the search asks often)

def _params(m):
    key = ("count", repr(m))
    if key not in _CACHE:
        _CACHE[key] = param_count(m)
    return _CACHE[key]

def with_layout(cfg, **keys):
    """cfg with other layout keys: those of [parallel] (tp, cp, pp, dp, virtual_stages, sequence_parallel) and
    of [train] (micro_batch_size, activation_checkpointing)."""
    par = {f.name for f in fields(parallel.ParallelConfig)}
    return {**cfg, "parallel": replace(cfg["parallel"], **{k: v for k, v in keys.items() if k in par}),
            "train": replace(cfg["train"], **{k: v for k, v in keys.items() if k not in par})}

def activation_bytes_per_token(m, tp, sp, wb, compiled, cp=1):
    """What autograd keeps for backward, per token and block, on one rank: tp splits the heads and the
    MLP, sp (sequence parallelism) the norms' inputs; wb is the weights' bytes per element. Under context
    parallelism (cp > 1) a rank's T/cp tokens keep, instead of their own K and V, the whole sequence's
    (cp times as many, all-gathered) and the int64 order that sorts them (parallel.gather_kv)."""
    d, ff = m.hidden_size, m.intermediate_size / tp
    hq, hkv, H = m.num_attention_heads * m.head_dim / tp, m.num_key_value_heads * m.head_dim / tp, m.num_attention_heads / tp
    # context parallelism: eager as measured (tests/test_context_parallel.py); compiled assumed alike, unmeasured
    gathered = 2 * (cp - 1) * wb * hkv + 8 * cp if cp > 1 else 0
    if compiled:  # measured on an H100 in bf16 (bench.py, activation_bytes_per_token_layer): the inputs of
        # the two norms and four matmul groups, q before and after norm + RoPE, k likewise, v, the
        # attention output, the MLP's up projection and activation, and the fp32 logsumexp
        return 4 * d / sp + 4 * d + 6 * hq + 8 * hkv + 4 * ff + 4 * H + gathered
    # eager, tensor by tensor (tests/test_train.py checks it against autograd's saved tensors): each norm
    # keeps its input in fp32 and its normalised output, each matmul group its input; q and k their fp32
    # copy, normalised and rotated values, v itself; the attention output (also o_proj's input, copied)
    # and the fp32 logsumexp; xIELU its input and intermediates (5 values and a mask per feature)
    return (2 * (4 + wb) * d / sp + 2 * wb * d + (4 + 4 * wb) * hq + (4 + 3 * wb) * hkv + 4 * H
            + (1 + 5 * wb) * ff + gathered)

def sequences(t):
    """Sequences per sample: dpo and qrpo count pairs in train.global_batch_size and micro_batch_size, two each."""
    return 2 if t.objective != "lm" else 1

def memory_plan(cfg, tp, dp, stage=0):
    """Per-GPU memory of one pipeline stage of a layout (stage 0: the first): a dict of named byte counts
    and the peak. Activations: see activation_bytes_per_token, for the T/cp tokens of a sequence that a
    rank computes under context parallelism. Under 1F1B, stage s holds the activations of min(pp - s, m)
    micro-batches at once; under the interleaved schedule (V virtual stages), those of min((V+1) pp - 2s
    - 1, m V) chunks of L/(pp V) layers (parallel.pipeline_interleaved): on the first stage L (1 + (pp-1)
    /(pp V)) layers' worth, Korthikanti et al. 2022 (arXiv 2205.05198), 4.2.3."""
    m, t, p = cfg["model"], cfg["train"], cfg["parallel"]
    pp = p.pp
    wb = _wbytes(t)  # a CPU run computes in float32 whatever train.dtype says
    moments = {"ademamix": 3 if t.beta1 != 0 else 2, "adamw": 2}[t.optimizer]
    seqs = sequences(t)
    B, T, d, L = t.micro_batch_size * seqs, cfg["data"].seq_len, m.hidden_size, m.num_hidden_layers
    N = B * T / p.cp  # tokens of one micro-batch on this rank
    zero = dp * p.cp  # ZeRO-1 partitions the optimizer over the dp x cp replicas of the weights
    first, last = stage == 0, stage == pp - 1
    embed = m.vocab_size * d
    per_layer = (_params(m) - 2 * embed - d) / L
    n = (per_layer * L / pp + embed * first + (embed + d) * last) / tp  # replicated norms: a rounding error
    sp = tp if p.sequence_parallel and tp > 1 else 1
    Vl = m.vocab_size / tp
    per_tok = activation_bytes_per_token(m, tp, sp, wb, t.compile, p.cp)
    V, micro = p.virtual_stages, t.global_batch_size // (dp * t.micro_batch_size)  # both count pairs under dpo, qrpo
    # in flight on this stage: 1F1B, micro-batches of its L/pp layers; interleaved, chunks of L/(pp V) layers
    held = min(pp - stage, micro) if V == 1 else min((V + 1) * pp - 2 * stage - 1, micro * V)
    if t.activation_checkpointing:  # block inputs, plus one block recomputed during backward
        activations = held * wb * d / sp * N * L / (pp * V) + per_tok * N
    else:
        activations = held * per_tok * N * L / (pp * V)
    what = f"{held} micro-batch{'es' if held > 1 else ''}" if V == 1 else f"{held} chunks of {L // (pp * V)} layers"
    chunk = min(_loss_rows(t, Vl), N) * Vl  # whole rows of logits, at most the micro-batch's (model.lm_head_loss)
    # fp32 head gradient and input gradient, and one chunk: its logits and gradient (and, eager, fp32 temporaries);
    # dpo and qrpo run the head row by row (model.forward's reduction="sequence"): a head gradient per sequence
    heads = B if seqs == 2 else 1
    loss = (4 * Vl * d * heads + 4 * N * d + chunk * (2 * wb + (0 if t.compile else 12))) if last else 0
    rows = {
        "weights": n * wb,
        "gradient buffer (fp32)": n * 4,
        "gradient partition (fp32, dp > 1)": n * 4 / zero if zero > 1 else 0,
        "fp32 master + optimizer moments": n * 4 * (1 + moments) / zero,
        f"activations ({what} in flight)": activations,
        "loss buffers (chunked head + cross-entropy)": loss,
        "head gradient handed to autograd": (4 + wb) * Vl * d if last else 0,  # at the start of backward
    }
    static = sum(v for k, v in rows.items() if k in ("weights", "gradient buffer (fp32)", "fp32 master + optimizer moments",
                                                        "gradient partition (fp32, dp > 1)"))
    # the update's fp32 temporaries (two per foreach batch of OPT_CHUNK elements) come after backward
    peak = static + max(activations + loss + rows["head gradient handed to autograd"], 2 * 4 * min(train.OPT_CHUNK, n / zero))
    return rows, peak

def plan_layout(cfg):
    """The numbers of the config's layout: {"tp", "cp", "pp", "dp", "gpus",
    "micro_batches", "stages": {(activation checkpointing, stage): (rows, peak bytes)}} for every stage
    that can be the largest (the first holds the most activations, the last the head and the loss)."""
    t, p = cfg["train"], cfg["parallel"]
    tp, dp = p.tp, p.dp or 1
    train.check_layout(cfg, tp * p.cp * p.pp * dp, dp)
    stages = {}
    for ckpt in (False, True):
        c = {**cfg, "train": replace(t, activation_checkpointing=ckpt)}
        for stage in sorted({0, p.pp - 1}):
            stages[ckpt, stage] = memory_plan(c, tp, dp, stage)
    return dict(tp=tp, cp=p.cp, pp=p.pp, dp=dp, gpus=tp * p.cp * p.pp * dp,
                micro_batches=t.global_batch_size // (dp * t.micro_batch_size), stages=stages)

def peak_memory(cfg, tp, dp):
    """The largest stage's planned peak, in bytes."""
    return max(memory_plan(cfg, tp, dp, s)[1] for s in {0, cfg["parallel"].pp - 1})

def format_plan(cfg, plan):
    """The plan as text, one block per activation-checkpointing choice and stage."""
    t, p = cfg["train"], cfg["parallel"]
    cp = f" cp={plan['cp']}" if plan["cp"] > 1 else ""
    pairs = f" pairs (x 2 sequences: {t.objective})" if t.objective != "lm" else ""
    lines = [f"layout tp={plan['tp']}{cp} pp={plan['pp']} dp={plan['dp']} ({plan['gpus']} GPUs)"
             f"{f', virtual_stages={p.virtual_stages}' if p.virtual_stages > 1 else ''}, micro_batch "
             f"{t.micro_batch_size}{pairs} x seq_len {cfg['data'].seq_len}, {plan['micro_batches']} micro-batches per "
             f"step, {t.dtype} weights, {t.optimizer}, sequence_parallel={p.sequence_parallel}, compile={t.compile}"]
    for (ckpt, stage), (rows, peak) in plan["stages"].items():
        if stage == 0:
            lines.append(f" {'with' if ckpt else 'without'} activation checkpointing:")
        name = "" if plan["pp"] == 1 else f" (stage {stage}, the {'first' if stage == 0 else 'last'})"
        lines += [f"  {k:<50}{v / 1e9:>9.1f} GB" for k, v in rows.items() if v]
        fits = ", ".join(f"{'fits' if peak < cap * FIT else 'does NOT fit'} {gpu}" for gpu, cap in GPUS)
        lines.append(f"  peak{name} {peak / 1e9:.1f} GB -> {fits}")
    lines.append("  (fits = under 90% of the GPU's memory, leaving room for the allocator's fragmentation)")
    return "\n".join(lines)

# ----------------------------------------------------------------------------- bytes: what a step sends
def _wbytes(t):
    """Bytes of a weight or activation element: bfloat16 on a GPU, float32 on a CPU (train.build)."""
    return 2 if t.dtype == "bfloat16" and t.device != "cpu" else 4

def _loss_rows(t, vocab_slice):
    """Rows of logits the loss handles at once (model.lm_head_loss)."""
    return model_py.loss_chunk_rows(vocab_slice, "cpu" if t.device == "cpu" else "cuda")

def stage_parameters(cfg, stage):
    """[(name, numel, role)] of one pipeline stage's TP-local parameters in model order: what its
    DistributedOptimizer lays out, built on the meta device by the code that builds a run."""
    m, p = cfg["model"], cfg["parallel"]
    # virtual stages change which layers a stage holds (and their names), not how many, nor the order of
    # the embedding, the blocks and the head in its buffers: built once per (tp, pp, stage), at V = 1
    key = ("stage", repr(m), p.tp, p.pp, stage)
    if key not in _CACHE:
        _CACHE[key] = [(n, t.numel(), t.role) for n, t in checkpoint._stage_parameters(m, p.tp, p.pp, stage)]
    return _CACHE[key]

def zero_layout(cfg, stage):
    """parallel.zero_layout of a stage's parameters over the dp x cp weight replicas: (index, buckets)."""
    p = cfg["parallel"]
    key = ("zero", repr(cfg["model"]), p.tp, p.pp, stage, (p.dp or 1) * p.cp, p.bucket_size)
    if key not in _CACHE:
        params = stage_parameters(cfg, stage)
        _CACHE[key] = parallel.zero_layout([(n, k) for n, k, _ in params], (p.dp or 1) * p.cp, p.bucket_size)
    return _CACHE[key]

def step_bytes(cfg, stage=0, dp_rank=0, logged=True, cp_rank=0):
    """What one training step hands to torch.distributed on one rank of a pipeline stage: {(kind, group):
    [calls, bytes]}, kind all_reduce / all_gather / reduce_scatter / send / recv, group tp / cp / pp / dp /
    dp_cp (the dp x cp replicas of the weights, under context parallelism) / world.
    The bytes are the whole tensor's: the buffer all-reduced, the all-gather's output, the reduce-scatter's
    input, the tensor sent or received. The step writes its metrics.jsonl line (logged), and neither
    evaluates nor saves. tests/test_plan.py counts the same on gloo: a change of the code's communication
    that this does not follow fails there."""
    m, t, p = cfg["model"], cfg["train"], cfg["parallel"]
    tp, cp, pp, dp, V = p.tp, p.cp, p.pp, p.dp or 1, p.virtual_stages
    out = {}

    def add(kind, group, calls, nbytes):
        if calls:
            c = out.setdefault((kind, group), [0, 0])
            c[0], c[1] = c[0] + calls, c[1] + nbytes
    if tp * cp * pp * dp == 1:
        return out
    wb, B, T, d = _wbytes(t), t.micro_batch_size * sequences(t), cfg["data"].seq_len, m.hidden_size
    micro = t.global_batch_size // (dp * t.micro_batch_size)  # micro-batches per step
    act = B * T // cp * d * wb                            # one [B, T/cp, d] activation, whole over TP
    sp = p.sequence_parallel and tp > 1
    blocks, ck = micro * m.num_hidden_layers // pp, t.activation_checkpointing
    first, last = stage == 0, stage == pp - 1
    pairs = t.objective != "lm"  # dpo, qrpo: the head and the loss run row by row (model.forward's "sequence")
    if tp > 1:
        # BLOCK_PLAN: per block, f before and g after each sublayer, forward and backward: 4 all-reduces, or
        # under sequence parallelism 4 all-gathers (f forward, g backward) and 4 reduce-scatters. Activation
        # checkpointing reruns the forward in backward, up to what backward needs (torch.utils.checkpoint
        # stops early): both f, the attention's g. Then the embedding's g and the head's f, once each.
        for kind, n in (("all_gather", 4 + 2 * ck), ("reduce_scatter", 4 + ck)) if sp else (("all_reduce", 4 + ck),):
            n = blocks * n + micro * (first + last)  # pairs: the head's f row by row, each 1/B of the activation
            add(kind, "tp", n + micro * (B - 1) * last * pairs, n * act)
        if last:  # vocab-parallel cross-entropy: the max, the sum of exp and the target logit, fp32, per chunk
            rows = _loss_rows(t, m.vocab_size // tp)
            chunks = B * -(-T // cp // rows) if pairs else -(-B * T // cp // rows)
            add("all_reduce", "tp", 3 * micro * chunks, 3 * micro * B * T // cp * 4)
    if cp > 1:  # parallel.gather_kv: per block, K and V (this rank's KV heads) of the whole sequence gathered
        # forward (again when checkpointing reruns it), their gradients reduce-scattered backward
        kv = B * T * 2 * m.num_key_value_heads // tp * m.head_dim * wb
        add("all_gather", "cp", blocks * (1 + ck), blocks * (1 + ck) * kv)
        add("reduce_scatter", "cp", blocks, blocks * kv)
        if pairs and last:  # train.pair_loss: each row's summed loss, over the CP ranks (fp32)
            add("all_reduce", "cp", micro, micro * B * 4)
    if pp > 1:  # each unit's activation (its sequence slice) to the next stage, its gradient back
        units = micro * V  # the last stage's last chunk sends no activation, the first's first no gradient
        sends = 2 * units - micro * (first + last)
        slice_bytes = act // (tp if sp else 1)  # [B, T/(cp tp), d] under sequence parallelism
        add("send", "pp", sends, sends * slice_bytes)
        add("recv", "pp", sends, sends * slice_bytes)
    replicas = "dp_cp" if cp > 1 else "dp"  # the ranks that hold the same weights (Grid.dp_cp_group)
    # pairs: no token count; beside the loss, the pairs' margin, accuracy and reward (3 float64)
    add("all_reduce", "dp", 0 if pairs else 1, 4)  # the global batch's token count (train.forward_backward)
    for group in (replicas, "pp") if pp > 1 else (replicas,):  # the loss, summed over the replicas and stages
        add("all_reduce", group, 2 if pairs else 1, 4 + 24 * pairs)
    params = stage_parameters(cfg, stage)
    index, buckets = zero_layout(cfg, stage)
    if dp * cp > 1:  # ZeRO-1: every bucket's fp32 gradients reduce-scattered, its updated weights all-gathered
        size = sum(b.size for b in buckets)
        add("reduce_scatter", replicas, len(buckets), 4 * size)
        add("all_gather", replicas, len(buckets), wb * size)
    grid = parallel.Grid(tp=tp, sequence_parallel=sp)
    roles = {n: r for n, _, r in params}
    pieces = parallel.zero_pieces(index, buckets, {n: k for n, k, _ in params}, dp_rank * cp + cp_rank, dp * cp)
    partial = sum(pc.end - pc.start for pc in pieces if parallel.tp_grad_is_partial(roles[pc.name], grid))
    if partial:  # the gradients each TP rank sees only part of, summed over TP after the DP reduction
        add("all_reduce", "tp", 1, 4 * partial)
    # the gradient norm (fp32), the two agreement flags (fp32), and on a logged step across_ranks (2 fp64, 1 fp64)
    add("all_reduce", "world", 2 + 2 * logged, 4 + 8 + 24 * logged)
    return out

def format_bytes(cfg):
    """step_bytes as text, for every stage that differs (the first, a middle one, the last), dp rank 0."""
    p = cfg["parallel"]
    lines = ["one training step (a logged one) hands torch.distributed, per rank: whole tensors (the buffer all-"
             "reduced, the all-gather's output, the reduce-scatter's input, the tensor sent or received)"]
    for stage in sorted({0, min(1, p.pp - 1), p.pp - 1}):
        name = "" if p.pp == 1 else f", stage {stage} of {p.pp}"
        lines.append(f" tp={p.tp}{f' cp={p.cp}' if p.cp > 1 else ''} pp={p.pp} dp={p.dp or 1}{name}:")
        for (kind, group), (calls, nbytes) in sorted(step_bytes(cfg, stage).items()):
            lines.append(f"  {kind:<16}{group:<7}{calls:>10,} calls {nbytes:>22,} bytes")
    return "\n".join(lines)

# ----------------------------------------------------------------------------- machines, measured efficiency
# A machine is a few numbers per GPU, each overridable: --machine.KEY=VALUE. gpus_per_node: the GPUs that
# share NVLink; memory_GB; peak_tflops: dense bf16; hbm_GBps: memory bandwidth (the update is bound by it);
# nvlink_GBps: per direction, between each pair of GPUs (nvlink_pairwise = 1: a collective of g GPUs of a
# node uses g - 1 links at once) or to the NVSwitch (nvlink_pairwise = 0); net_GBps: per GPU between nodes;
# latency_us: per collective call (0: left out, not measured here); efficiency: the compute efficiency
# (0: the measured row of EFFICIENCY nearest the layout's shape). Sources: Alps as APERTUS.md section 3
# gives it (4 GH200 a node, NVLink 150 GB/s per direction between each pair, Slingshot-11 25 GB/s per
# GPU, 96 GB); NVIDIA's datasheets for the rest (dense bf16 peak: train.PEAK_BF16_FLOPS; HBM3 4 TB/s on the
# 96 GB GH200, 3.35 TB/s on the H100 SXM; NVLink 4 at 900 GB/s both ways through NVSwitch; one 400 Gb/s NDR
# InfiniBand NIC per H100, 50 GB/s).
MACHINES = {
    "gh200-alps": dict(gpus_per_node=4, memory_GB=96, peak_tflops=round(train.PEAK_BF16_FLOPS["GH200"] / 1e12),
                       hbm_GBps=4000, nvlink_GBps=150, nvlink_pairwise=1, net_GBps=25, latency_us=0, efficiency=0),
    "h100-sxm": dict(gpus_per_node=8, memory_GB=80, peak_tflops=round(train.PEAK_BF16_FLOPS["H100"] / 1e12),
                     hbm_GBps=3350, nvlink_GBps=450, nvlink_pairwise=0, net_GBps=50, latency_us=0, efficiency=0),
}

# Compute efficiency, measured: whole optimizer steps on one GPU (bench.py: forward, backward, loss, ZeRO
# hooks, update), by the shape one rank computes: its MFU and step, its parameters (ademamix) and the GPU's
# memory bandwidth, so that the update, a term of its own here, is taken out (compute_mfu). BENCHMARKS.md,
# "Throughput, one GPU": one H100 80GB HBM3 SXM (3.35 TB/s), PyTorch 2.11, measured 2026-11-25 (the
# first-loss rows before the loss's passes were compiled, so below what this tree does). A layout takes
# the row nearest its per-rank shape; bench.py prints such a row for the GPU it runs on ("plan_row" in
# its JSON line), and `plan.py --efficiency FILE` adds those of FILE's lines (or paste it here).
EFFICIENCY = [
    dict(name="apertus-1b, final loss", hidden=2048, q_width=2048, mlp_width=9216, tokens=16384, compile=True,
         mfu=0.493, step_s=1.895, params=1_308_694_560, hbm_GBps=3350,
         source="BENCHMARKS.md, H100 2026-11-25: python bench.py configs/apertus-1b.toml --steps 5 --warmup 2"),
    dict(name="apertus-1b micro-batch 8, final loss", hidden=2048, q_width=2048, mlp_width=9216, tokens=32768,
         compile=True, mfu=0.508, step_s=1.840, params=1_308_694_560, hbm_GBps=3350,
         source="BENCHMARKS.md, H100 2026-11-25: python bench.py configs/apertus-1b.toml --train.micro_batch_size=8 "
                "--steps 4 --warmup 2"),
    dict(name="Apertus-8B layers at full width, first loss", hidden=4096, q_width=4096, mlp_width=21504, tokens=16384,
         compile=True, mfu=0.341, step_s=1.721, params=1_946_194_952, hbm_GBps=3350,
         source="BENCHMARKS.md, H100 2026-11-25: python bench.py configs/apertus-8b.toml --parallel.tp=1 "
                "--model.num_hidden_layers=4 --train.global_batch_size=16 --steps 4 --warmup 2"),
    dict(name="Apertus-70B per-rank shapes of TP 4, first loss", hidden=8192, q_width=2048, mlp_width=10752, tokens=4096,
         compile=True, mfu=0.401, step_s=0.574, params=1_392_583_688, hbm_GBps=3350,
         source="BENCHMARKS.md, H100 2026-11-25: python bench.py configs/apertus-70b.toml --per-rank-tp 4 "
                "--model.num_hidden_layers=4 --train.global_batch_size=8 --steps 5 --warmup 2"),
    dict(name="apertus-1b eager, first loss", hidden=2048, q_width=2048, mlp_width=9216, tokens=16384, compile=False,
         mfu=0.195, step_s=4.795, params=1_308_694_560, hbm_GBps=3350,
         source="BENCHMARKS.md, H100 2026-11-25: python bench.py configs/apertus-1b.toml --train.compile=false "
                "--steps 3 --warmup 1"),
]

# Measured on Alps (APERTUS.md section 3, from the Apertus tech report arXiv 2509.14233): tokens/s/GPU at
# the models' own layouts, and the 70B's strong-scaling efficiency from 32 to 4,096 GPUs at its batch
PUBLISHED = [
    dict(model="Apertus-70B", params=70_599_864_480, tp=4, pp=8, dp=128, virtual_stages=2, micro_batch=1,
         global_batch=4096, seq_len=4096, machine="gh200-alps", tokens_per_s=723, scaling=(32, 4096, 0.80)),
    dict(model="Apertus-8B", params=8_053_338_176, tp=2, pp=1, dp=512, virtual_stages=1, micro_batch=4,
         global_batch=2048, seq_len=4096, machine="gh200-alps", tokens_per_s=6960, scaling=None),
]
OPTIMIZER_BYTES = {"ademamix": 124, "adamw": 80}  # per fp32 element, read and written by the update's foreach
# ops (train.AdEMAMix.step: 2 lerps 12 B each, v 8 + 12, the denominator 3 x 8, the update 8 + 12 + 12 + 12, the
# weights 12; AdamW.step: 8 + 12 + 8 + 12 + 3 x 8 + 16)

def published(cfg, machine_name, dp=True):
    """The PUBLISHED measurement of this model, layout (any dp if dp is False) and machine, or None."""
    m, t, p = cfg["model"], cfg["train"], cfg["parallel"]
    here = dict(params=_params(m), tp=p.tp, pp=p.pp, dp=p.dp or 1, virtual_stages=p.virtual_stages,
                micro_batch=t.micro_batch_size, global_batch=t.global_batch_size, seq_len=cfg["data"].seq_len,
                machine=machine_name)
    for row in PUBLISHED:
        if all(row[k] == v for k, v in here.items() if dp or k != "dp"):
            return row
    return None

def update_bytes(n, dp, optimizer, wb):
    """Bytes the update reads and writes for n parameters (TP-local) partitioned over dp ranks: on the
    partition the update's own traffic (OPTIMIZER_BYTES), the norm (4 B) and clipping (8 B), the copy back
    into the weights (4 B + the weight's); zeroing the whole fp32 gradient buffer (4 B an element of n)
    and the partition."""
    return n / dp * (OPTIMIZER_BYTES[optimizer] + 12 + 4 + wb) + 4 * n + (4 * n / dp if dp > 1 else 0)

def compute_mfu(row):
    """A row's MFU over its forward and backward: its step less the update, as optimizer_s counts it on one
    GPU of the row's memory bandwidth (a tenth of the 4-layer 70B's short step, 3% of the 1B's). A row
    without step_s, params and hbm_GBps is taken as it is."""
    if not all(row.get(k) for k in ("step_s", "params", "hbm_GBps")):
        return row["mfu"]
    update = update_bytes(row["params"], 1, row.get("optimizer", "ademamix"), 2) / (row["hbm_GBps"] * 1e9)
    return row["mfu"] * row["step_s"] / (row["step_s"] - update)

def efficiency_row(cfg, rows):
    """The measured row nearest the matrices one rank multiplies: hidden size, query and MLP widths on the
    rank (the sum of the log ratios; the first of equals), among the rows compiled (or not) as the config
    is. The tokens of a micro-batch (the matmuls' other side) are not compared: every row has 4,096 or more,
    where a Hopper matmul is compute-bound."""
    m, t, tp = cfg["model"], cfg["train"], cfg["parallel"].tp
    shape = (m.hidden_size, m.num_attention_heads * m.head_dim / tp, m.intermediate_size / tp)
    same = [r for r in rows if r["compile"] == t.compile] or rows
    return min(same, key=lambda r: sum(abs(math.log(a / b)) for a, b in zip(shape, (r["hidden"], r["q_width"],
                                                                                     r["mlp_width"]))))

# ----------------------------------------------------------------------------- time: a sum of named terms
def _bandwidth(machine, cfg, group):
    """Bytes/s one GPU gets in a collective of `group` (Megatron's order, parallel.py: TP groups are
    consecutive ranks, pipeline neighbours tp apart, DP groups span the world): NVLink when the group sits
    in one node (g - 1 links at once where each pair of GPUs has its own, one to the switch otherwise; a
    send goes over one), else the network between nodes, the slower link of the ring. CP groups are
    tp apart, inside the pipeline stage's tp x cp ranks."""
    p = cfg["parallel"]
    world = p.tp * p.cp * p.pp * (p.dp or 1)
    size, span = {"tp": (p.tp, p.tp), "cp": (p.cp, p.tp * p.cp), "pp": (2, p.tp * p.cp * p.pp), "dp": (p.dp or 1, world),
                  "dp_cp": ((p.dp or 1) * p.cp, world), "world": (world, world)}[group]
    if span > machine["gpus_per_node"]:
        return machine["net_GBps"] * 1e9
    return machine["nvlink_GBps"] * 1e9 * (size - 1 if machine["nvlink_pairwise"] and size > 2 else 1)

def collective_s(kind, g, calls, nbytes, bw, latency_s=0.0):
    """The alpha-beta model of a ring (NCCL's bus bandwidth): per rank an all-reduce moves 2 (g-1)/g of its
    buffer, an all-gather or reduce-scatter (g-1)/g of the whole tensor, a send its tensor (a receive comes
    in over the other direction of full-duplex links: its send counts it); each call costs latency_s."""
    moved = {"all_reduce": 2 * (g - 1) / g, "all_gather": (g - 1) / g, "reduce_scatter": (g - 1) / g,
             "send": 1.0, "recv": 0.0}[kind]
    return calls * latency_s + moved * nbytes / bw if moved else 0.0

def _comm_s(cfg, machine, counts, keep):
    """Seconds of the collectives in step_bytes' counts whose (kind, group) `keep` accepts."""
    p = cfg["parallel"]
    size = dict(tp=p.tp, cp=p.cp, pp=p.pp, dp=p.dp or 1, dp_cp=(p.dp or 1) * p.cp, world=p.tp * p.cp * p.pp * (p.dp or 1))
    return sum(collective_s(kind, size[group], calls, nbytes, _bandwidth(machine, cfg, group), machine["latency_us"] * 1e-6)
               for (kind, group), (calls, nbytes) in counts.items() if keep(kind, group))

def compute_s(cfg, stage, machine, mfu):
    """The FLOPs a rank of this stage runs in a step, over peak x efficiency. Per token (model.flops_per_token):
    6 x a layer's parameters + causal attention, 6 H D T, for each of its L/pp layers, and 6 x the head's (and
    the final norm's) on the last stage; activation checkpointing runs each block's forward again (8/6 of
    its FLOPs). Each rank computes 1/tp of it, for its replica's global_batch x T / dp tokens, 1/cp of them
    under context parallelism (the head-tail split gives every CP rank the same causal attention work)."""
    m, t, p = cfg["model"], cfg["train"], cfg["parallel"]
    T = cfg["data"].seq_len
    head = 6 * (m.vocab_size + 1) * m.hidden_size
    layer = (flops_per_token(m, T, _params(m)) - head) / m.num_hidden_layers
    flops = layer * m.num_hidden_layers / p.pp * (8 / 6 if t.activation_checkpointing else 1) + head * (stage == p.pp - 1)
    tokens = t.global_batch_size * sequences(t) * T / ((p.dp or 1) * p.cp)  # this replica's, 1/cp of them
    return tokens * flops / p.tp / (machine["peak_tflops"] * 1e12 * mfu)

def dp_exposed_s(cfg, stage, rs_s, ag_s, unit_f, unit_b):
    """The parts of the ZeRO-1 reduce-scatter (rs_s) and all-gather (ag_s) that compute does not hide, as the
    code overlaps them; unit_f and unit_b: one unit's forward and backward (a micro-batch through one chunk).
    Chunk c's gradients reduce from the start of its last backward unit (opt.sync), chunk V-1's first, while
    the later chunks' c pp backward units and the s units of the stages that end after this one run; the
    bucket of the stage's first layers (and the embedding) is complete only at the very end. The weights are
    gathered after the step in forward order, that bucket first: needed at once by the first stage, and
    each chunk's, layer by layer, during its first forward unit of the next step, in round s + c pp
    (parallel.pipeline_interleaved; V = 1 is 1F1B)."""
    p = cfg["parallel"]
    pp, V = p.pp, p.virtual_stages
    share = [0.0] * V  # each chunk's share of the stage's parameters (the embedding in chunk 0, the head in V-1)
    params = stage_parameters(cfg, stage)
    layers = sorted({int(n.split(".")[2]) for n, _, _ in params if n.startswith("model.layers.")})
    total = sum(k for _, k, _ in params)
    for n, k, _ in params:
        c = layers.index(int(n.split(".")[2])) * V // len(layers) if n.startswith("model.layers.") else \
            (0 if n.startswith("model.embed_tokens") else V - 1)
        share[c] += k / total
    _, buckets = zero_layout(cfg, stage)
    last = buckets[-1].size / sum(b.size for b in buckets)  # the bucket of the first layers, last in backward
    net, end = 0.0, ((V - 1) * pp + 1) * unit_b  # when the network is free; when this rank's backward ends
    for c in reversed(range(V)):
        net = max(net, (V - 1 - c) * pp * unit_b) + rs_s * share[c]
    rs = max(0.0, max(net, end + rs_s * last) - end - stage * unit_b)
    net, ag = 0.0, ag_s * last - stage * unit_f
    for c in range(V):
        net += ag_s * share[c]
        ag = max(ag, net - (stage + c * pp + 1) * unit_f)
    return rs, max(0.0, ag)

def optimizer_s(cfg, stage, machine):
    """The update, bound by memory bandwidth: update_bytes of the stage's parameters over the GPU's."""
    t = cfg["train"]
    n = sum(k for _, k, _ in stage_parameters(cfg, stage))
    return update_bytes(n, (cfg["parallel"].dp or 1) * cfg["parallel"].cp, t.optimizer, _wbytes(t)) / (machine["hbm_GBps"] * 1e9)

TERMS = ("compute", "tensor/sequence-parallel collectives", "context-parallel K/V all-gathers", "pipeline bubble",
         "pipeline point-to-point",
         "data-parallel reduce-scatter, not hidden", "data-parallel all-gather, not hidden",
         "optimizer step (memory-bound)", "small all-reduces (loss, token count, norm, flags)")

def step_time(cfg, machine, rows=EFFICIENCY):
    """One training step on `machine`: {"terms": {name: seconds}} that sum to "step_s", the stages they come
    from, "tokens_per_s_gpu", "mfu" and the efficiency "row". For the first and the last stage (the
    middle ones do less: no embedding, no head, a longer tail):
        work(s) = compute + tensor- and context-parallel collectives + point-to-point sends, over its units
        bubble  = (pp - 1) / (V m) x the largest work (Narayanan et al. 2021, arXiv 2104.04473, 2.2)
        tail(s) = reduce-scatter and all-gather not hidden + the update + the small all-reduces
        step    = the largest work + bubble + the largest tail
    The collectives of a rank's own work run on its stream (not hidden); the tensor-parallel ones over the
    TP group's links, the sends to the pipeline neighbour, the ZeRO ones over the DP group's."""
    m, t, p = cfg["model"], cfg["train"], cfg["parallel"]
    dp, V = p.dp or 1, p.virtual_stages
    micro = t.global_batch_size // (dp * t.micro_batch_size)
    row = efficiency_row(cfg, rows) if not machine["efficiency"] else \
        dict(name="--machine.efficiency", mfu=machine["efficiency"], source="given on the command line")
    row = dict(row, compute_mfu=compute_mfu(row))
    fwd = 1 / 4 if t.activation_checkpointing else 1 / 3  # the forward's share of a unit's FLOPs (2 of 6 or 8 N)
    per = {}
    for s in sorted({0, p.pp - 1}):
        counts = step_bytes(cfg, s)
        c = compute_s(cfg, s, machine, row["compute_mfu"])
        tpc = _comm_s(cfg, machine, counts, lambda k, g: g == "tp")
        cpc = _comm_s(cfg, machine, counts, lambda k, g: g == "cp")
        p2p = _comm_s(cfg, machine, counts, lambda k, g: k in ("send", "recv"))
        zero = lambda kind: _comm_s(cfg, machine, counts, lambda k, g: k == kind and g in ("dp", "dp_cp"))  # noqa: E731
        unit = (c + tpc + cpc) / (micro * V)  # one micro-batch through one chunk, forward and backward
        rs, ag = dp_exposed_s(cfg, s, zero("reduce_scatter"), zero("all_gather"), unit * fwd, unit * (1 - fwd))
        small = _comm_s(cfg, machine, counts, lambda k, g: k == "all_reduce" and g != "tp")
        per[s] = dict(work=(c, tpc, cpc, p2p), tail=(rs, ag, optimizer_s(cfg, s, machine), small))
    w = max(per, key=lambda s: sum(per[s]["work"]))
    tl = max(per, key=lambda s: sum(per[s]["tail"]))
    bubble = (p.pp - 1) / (V * micro) * sum(per[w]["work"])
    values = (*per[w]["work"][:3], bubble, per[w]["work"][3], *per[tl]["tail"])
    step = sum(values)
    gpus = p.tp * p.cp * p.pp * dp
    tps = t.global_batch_size * sequences(t) * cfg["data"].seq_len / step / gpus
    return dict(terms=dict(zip(TERMS, values)), step_s=step, tokens_per_s_gpu=tps, work_stage=w, tail_stage=tl,
                mfu=tps * flops_per_token(m, cfg["data"].seq_len, _params(m)) / (machine["peak_tflops"] * 1e12),
                row=row, micro_batches=micro, gpus=gpus)

def _layout_name(cfg):
    p, t = cfg["parallel"], cfg["train"]
    return (f"tp={p.tp}{f' cp={p.cp}' if p.cp > 1 else ''} pp={p.pp}"
            f"{f' virtual_stages={p.virtual_stages}' if p.virtual_stages > 1 else ''} dp={p.dp or 1}, "
            f"micro-batch {t.micro_batch_size}{', sequence parallel' if p.sequence_parallel and p.tp > 1 else ''}"
            f"{', activation checkpointing' if t.activation_checkpointing else ''}")

def format_time(cfg, name, machine, r):
    """step_time as text: the terms, the step, tokens/s/GPU and MFU, and the published measurement beside."""
    p, t = cfg["parallel"], cfg["train"]
    lines = [f"step time on {r['gpus']:,} x {name} ({_layout_name(cfg)}; {r['micro_batches']} micro-batches of "
             f"{t.micro_batch_size} x {cfg['data'].seq_len} tokens per step):"]
    why = {"compute": f"at {r['row']['compute_mfu']:.1%} of {machine['peak_tflops']} TFLOP/s, measured: {r['row']['name']}",
           "pipeline bubble": f"(pp-1)/(V m) = {p.pp - 1}/{p.virtual_stages * r['micro_batches']} of the stage's work",
           "tensor/sequence-parallel collectives": "not overlapped"}
    for k, v in r["terms"].items():
        if k.startswith("context") and p.cp == 1:
            continue
        stage = r["work_stage"] if TERMS.index(k) < 5 else r["tail_stage"]
        where = f" (stage {stage})" if p.pp > 1 and k != "pipeline bubble" else ""
        lines.append(f"  {k:<52}{v:>9.3f} s{where}  {why.get(k, '')}".rstrip())
    lines.append(f"  {'step':<52}{r['step_s']:>9.3f} s  -> {r['tokens_per_s_gpu']:,.0f} tokens/s/GPU, MFU {r['mfu']:.1%} "
                 f"(6N + causal attention)")
    pub = published(cfg, name)
    if pub:
        lines.append(f"  measured on Alps: {pub['tokens_per_s']:,} tokens/s/GPU ({pub['model']}, APERTUS.md section 3): "
                     f"the plan is {r['tokens_per_s_gpu'] / pub['tokens_per_s'] - 1:+.1%} off")
    lines.append(f"  (compute efficiency from: {r['row']['source']})")
    return "\n".join(lines)

# ----------------------------------------------------------------------------- search and scaling
def _divisors(n):
    return [k for k in range(1, n + 1) if n % k == 0]

def search(cfg, machine, gpus, rows=EFFICIENCY):
    """Every layout of `gpus` GPUs that check_layout accepts and whose largest stage fits FIT of the GPU's
    memory: tp (up to two nodes), cp (while a rank keeps 4,096 tokens of a sequence or more: Apertus used it
    from 32k tokens on, with 8k a rank), pp, virtual stages, micro-batch (1 to 8), activation checkpointing
    and sequence parallelism, dp the rest; ranked by predicted tokens/s/GPU: [(tokens/s/GPU, cfg, step_time)]."""
    m, t, T = cfg["model"], cfg["train"], cfg["data"].seq_len
    tps = [k for k in (1, 2, 4, 8, 16) if k <= 2 * machine["gpus_per_node"]]
    cps = [k for k in (1, 2, 4, 8, 16, 32) if k == 1 or T // k >= 4096]
    out = []
    for tp, cp, pp in itertools.product(tps, cps, _divisors(m.num_hidden_layers)):
        if gpus % (tp * cp * pp):
            continue
        dp = gpus // (tp * cp * pp)
        for V, micro, ckpt, sp in itertools.product(_divisors(m.num_hidden_layers // pp) if pp > 1 else [1], (1, 2, 4, 8),
                                                    (False, True), (False, True) if tp > 1 else (False,)):
            try:
                parallel.check_layout(m, gpus, tp, dp, t.global_batch_size, micro, T, sp, pp, cp, V)
            except parallel.LayoutError:
                continue
            c = with_layout(cfg, tp=tp, cp=cp, pp=pp, dp=dp, virtual_stages=V, micro_batch_size=micro,
                            activation_checkpointing=ckpt, sequence_parallel=sp)
            if peak_memory(c, tp, dp) < FIT * machine["memory_GB"] * 1e9:
                r = step_time(c, machine, rows)
                out.append((r["tokens_per_s_gpu"], c, r))
    return sorted(out, key=lambda x: -x[0])

def format_search(cfg, name, machine, gpus, ranked, top=10):
    t = cfg["train"]
    lines = [f"the {min(top, len(ranked))} fastest of {len(ranked)} layouts of {gpus:,} x {name} that fit {FIT:.0%} of "
             f"{machine['memory_GB']} GB (global batch {t.global_batch_size} x {cfg['data'].seq_len}):",
             f"  {'#':>3} {'tp':>3} {'cp':>3} {'pp':>3} {'V':>3} {'dp':>5} {'micro':>5} {'sp':>3} {'ckpt':>4} {'peak GB':>8} "
             f"{'step s':>8} {'tokens/s/GPU':>13} {'MFU':>6}"]
    for i, (tps, c, r) in enumerate(ranked[:top]):
        p, tt = c["parallel"], c["train"]
        lines.append(f"  {i + 1:>3} {p.tp:>3} {p.cp:>3} {p.pp:>3} {p.virtual_stages:>3} {p.dp:>5} {tt.micro_batch_size:>5} "
                     f"{'y' if p.sequence_parallel else '-':>3} {'y' if tt.activation_checkpointing else '-':>4} "
                     f"{peak_memory(c, p.tp, p.dp) / 1e9:>8.1f} {r['step_s']:>8.3f} {tps:>13,.0f} {r['mfu']:>6.1%}")
    p = cfg["parallel"]
    mine = with_layout(cfg, dp=gpus // (p.tp * p.cp * p.pp))
    rank = next((i for i, (_, c, _) in enumerate(ranked) if _layout_name(c) == _layout_name(mine)), None)
    if rank is None:
        lines.append(f"the config's layout ({_layout_name(mine)}) is not among them (it does not fit, or is refused)")
    else:
        first, own = ranked[0][2], ranked[rank][2]
        lines.append(f"the config's layout ({_layout_name(mine)}) ranks #{rank + 1}: {ranked[rank][0]:,.0f} tokens/s/GPU")
        if rank:
            diffs = sorted(((own["terms"][k] - first["terms"][k], k) for k in TERMS), reverse=True)
            lines.append(f"#1 ({_layout_name(ranked[0][1])}) is {ranked[0][0] / ranked[rank][0] - 1:.1%} faster: " +
                         "; ".join(f"{k} {own['terms'][k]:.3f} -> {first['terms'][k]:.3f} s" for d, k in diffs if abs(d) > 0.0005))
    return "\n".join(lines)

def scaling(cfg, machine, gpus, rows=EFFICIENCY):
    """Strong scaling at the config's global batch: its tp, pp, virtual stages and micro-batch with dp = 1, 2,
    4, ... up to gpus / (tp pp): [(gpus, cfg, step_time, efficiency, fits)], efficiency being tokens/s/GPU over
    the smallest layout's."""
    p = cfg["parallel"]
    out, dp = [], 1
    while dp * p.tp * p.cp * p.pp <= gpus:
        c = with_layout(cfg, dp=dp)
        r = step_time(c, machine, rows)
        fits = peak_memory(c, p.tp, dp) < FIT * machine["memory_GB"] * 1e9
        out.append((dp * p.tp * p.cp * p.pp, c, r, r["tokens_per_s_gpu"] / (out[0][2] if out else r)["tokens_per_s_gpu"], fits))
        dp *= 2
    return out

def format_scaling(cfg, name, curve):
    t = cfg["train"]
    lines = [f"strong scaling at a constant global batch of {t.global_batch_size} x {cfg['data'].seq_len} tokens on "
             f"{name} ({_layout_name(curve[0][1]).split(' dp=')[0]}, dp grows):",
             f"  {'GPUs':>6} {'dp':>5} {'micro-batches':>13} {'step s':>9} {'tokens/s/GPU':>13} {'efficiency':>10}  memory"]
    for gpus, c, r, eff, fits in curve:
        lines.append(f"  {gpus:>6,} {c['parallel'].dp:>5} {r['micro_batches']:>13,} {r['step_s']:>9.2f} "
                     f"{r['tokens_per_s_gpu']:>13,.0f} {eff:>10.1%}  {'fits' if fits else 'does NOT fit'}")
    pub = published(curve[-1][1], name, dp=False)
    if pub and pub["scaling"] and (curve[0][0], curve[-1][0]) == pub["scaling"][:2]:
        lines.append(f"  measured on Alps: {pub['scaling'][2]:.0%} from {pub['scaling'][0]:,} to {pub['scaling'][1]:,} GPUs "
                     f"({pub['model']}, APERTUS.md section 3); planned {curve[-1][3]:.0%}")
    return "\n".join(lines)

# ----------------------------------------------------------------------------- the architecture
def audit(cfg, seq_len: int = 4096) -> str:
    """The architecture of a [model] section: parameter count by component, FLOPs per token and size, from a
    model built on the meta device (nothing is allocated: the 70B's 282 GB of fp32 never exist)."""
    with torch.device("meta"):
        m = model_py.Apertus(cfg)
    groups = {"embedding": 0, "attention (q,k,v,o)": 0, "QK-norm": 0, "MLP (up, down)": 0,
              "xIELU scalars": 0, "layer norms": 0, "final norm": 0, "lm_head": 0}
    for name, p in m.named_parameters():
        n = p.numel()
        key = ("embedding" if "embed" in name else "lm_head" if "lm_head" in name else
               "QK-norm" if "q_norm" in name or "k_norm" in name else
               "attention (q,k,v,o)" if "self_attn" in name else
               "xIELU scalars" if "act_fn" in name else "MLP (up, down)" if "mlp" in name else
               "final norm" if name == "model.norm.weight" else "layer norms")
        groups[key] += n
    total = sum(groups.values())
    L, H, D = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim
    flops = flops_per_token(cfg, seq_len, total)
    lines = [f"Apertus: d={cfg.hidden_size}, layers={L}, heads={H}/{cfg.num_key_value_heads} (q/kv), "
             f"head_dim={D}, mlp={cfg.intermediate_size}, vocab={cfg.vocab_size}",
             f"{'component':<22}{'parameters':>18}{'share':>8}"]
    lines += [f"{k:<22}{v:>18,}{v / total:>8.1%}" for k, v in groups.items()]
    lines += [f"{'total':<22}{total:>18,}",
              f"training FLOPs/token at seq_len {seq_len}: {flops:.4g} = 6N' + 6 x L x H x D x T "
              f"(N' = parameters without the input embedding, a lookup; the matmuls forward and backward, "
              f"plus causal attention: half of the 12LHDT of full attention)",
              f"bf16 weights: {2 * total / 1e9:.2f} GB ({2 * total / 2**30:.2f} GiB)"]
    return "\n".join(lines)

# ----------------------------------------------------------------------------- the command
def load(path, overrides):
    """The config as train.py reads it; with train.init_from, the architecture of that directory when it
    can be read here (else the [model] section as written, and a line that says so)."""
    cfg = train.load_config(path, overrides)
    if cfg["train"].init_from:
        try:
            cfg["model"] = checkpoint.init_from_config(cfg["train"].init_from, cfg["train"].out_dir, cfg["model"],
                                                       cfg["model_keys"])
        except checkpoint.CheckpointError as e:
            print(f"note: {e}; planning with the [model] section as written", file=sys.stderr)
    return cfg

def read_rows(path):
    """The plan_row of every JSON line bench.py printed into `path`."""
    with open(path) as f:
        rows = [json.loads(line).get("plan_row") for line in f if line.startswith("{")]
    if not any(rows):
        raise ValueError(f"{path} holds no bench.py line with a plan_row")
    return [r for r in rows if r]

def machine_from(name, what_if):
    """MACHINES[name] with --machine.KEY=VALUE overrides."""
    if name not in MACHINES:
        raise ValueError(f"unknown machine {name!r} (known: {', '.join(MACHINES)})")
    machine = dict(MACHINES[name])
    for arg in what_if:
        key, _, value = arg[len("--machine."):].partition("=")
        if key not in machine:
            raise ValueError(f"unknown machine key {key!r} (known: {', '.join(machine)})")
        try:
            machine[key] = float(value)
        except ValueError:
            raise ValueError(f"--machine.{key} needs a number, got {value!r}") from None
    return machine

def main(argv):
    args = [a for a in argv if a != "--plan"]
    what_if = [a for a in args if a.startswith("--machine.")]
    ap = argparse.ArgumentParser(prog="plan.py", allow_abbrev=False, add_help=False)
    ap.add_argument("config", nargs="?")
    ap.add_argument("--machine")
    ap.add_argument("--gpus", type=int)
    ap.add_argument("--efficiency")
    for flag in ("--audit", "--bytes", "--search", "--scaling", "--help"):
        ap.add_argument(flag, action="store_true")
    opts, overrides = ap.parse_known_args([a for a in args if a not in what_if])
    if opts.help or not opts.config or opts.config.startswith("--"):
        print(__doc__)
        return 2
    try:
        cfg = load(opts.config, overrides)
        rows = read_rows(opts.efficiency) + EFFICIENCY if opts.efficiency else EFFICIENCY
        if (what_if or opts.search or opts.scaling) and not opts.machine:
            raise ValueError("--machine.KEY, --search and --scaling need --machine NAME")
        machine = machine_from(opts.machine, what_if) if opts.machine else None
        p = cfg["parallel"]
        if opts.gpus is not None:
            if opts.gpus < 1 or opts.gpus % (p.tp * p.cp * p.pp):
                raise ValueError(f"--gpus {opts.gpus} is not a positive multiple of tp x cp x pp = {p.tp} x {p.cp} x {p.pp}")
            cfg = with_layout(cfg, dp=opts.gpus // (p.tp * p.cp * p.pp))
        gpus = p.tp * p.cp * p.pp * (cfg["parallel"].dp or 1)
        if opts.audit:
            print(audit(cfg["model"], cfg["data"].seq_len))
        elif opts.search:
            print(format_search(cfg, opts.machine, machine, gpus, search(cfg, machine, gpus, rows)))
        elif opts.scaling:
            print(format_scaling(cfg, opts.machine, scaling(cfg, machine, gpus, rows)))
        else:
            print(format_plan(cfg, plan_layout(cfg)))
            if opts.bytes:
                print(format_bytes(cfg))
            if machine:
                print(format_time(cfg, opts.machine, machine, step_time(cfg, machine, rows)))
    except (train.ConfigError, parallel.LayoutError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
