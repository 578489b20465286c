"""Train Apertus: the loop and the recipe (AdEMAMix, WSD schedule, Goldfish loss).

One process (CPU or one GPU):
    python train.py configs/tiny.toml
    python train.py configs/tiny.toml --train.max_steps=50 --train.out_dir=out/try
One node, 4 GPUs, tensor parallel inside the node:
    torchrun --standalone --nproc_per_node=4 train.py configs/apertus-8b.toml --parallel.tp=2
Many nodes under Slurm (see configs/alps.sbatch):
    srun torchrun --nnodes=$SLURM_NNODES --nproc_per_node=4 --rdzv_backend=c10d \\
         --rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT train.py configs/apertus-70b.toml --parallel.tp=4
    (or srun --ntasks-per-node=4 python train.py ..., with MASTER_ADDR / MASTER_PORT exported)
Memory plan of a layout, without allocating anything (plan.py; `train.py CONFIG --plan` is the same):
    python plan.py configs/apertus-70b.toml --parallel.tp=4 --parallel.pp=8 --parallel.dp=128

Every key of the config can be overridden as --section.key=value. A run directory that holds a
checkpoint is resumed from its newest good one, under any (tp, cp, pp, dp) layout.
"""
import contextlib
import faulthandler
import functools
import importlib.util
import json
import math
import os
import signal
import sys
import time
import tomllib
import typing
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
import data
import parallel
import prepare  # the tokenizer of the sample and the demo corpus of `demo:` sources
from model import Apertus, ModelConfig, document_ids, flops_per_token, param_count

@dataclass
class TrainConfig:
    """The [train] section."""
    out_dir: str = "out/run"            # checkpoints, metrics.jsonl and config.json go here
    max_steps: int = 1000               # optimizer steps
    global_batch_size: int = 32         # sequences per optimizer step, whatever the layout
    micro_batch_size: int = 8           # sequences per forward/backward on one rank
    log_interval: int = 10              # steps between lines in metrics.jsonl (0 = only at the end)
    eval_interval: int = 100            # steps between validation passes (0 = only at the end)
    checkpoint_interval: int = 250      # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 3           # the newest this many are kept, older ones deleted after each save
    device: str = "auto"                # auto, cpu or cuda
    dtype: str = "bfloat16"             # weights and compute on CUDA: bfloat16 or float32 (CPU: float32)
    compile: bool = False               # torch.compile each transformer block (and the loss chunks)
    activation_checkpointing: bool = False  # recompute each block in backward
    seed: int = 0                       # initial weights and the data order
    optimizer: str = "ademamix"         # ademamix or adamw
    lr: float = 1.1e-4                  # peak learning rate
    min_lr: float = 1.1e-5              # the learning rate at the end of the cooldown
    warmup_steps: int = 100             # linear warmup from 0
    decay_start: int = -1               # first step of the cooldown (-1: max_steps - decay_steps)
    decay_steps: int = 0                # length of the cooldown (0: no cooldown)
    decay_shape: str = "1-sqrt"         # 1-sqrt or linear
    beta1: float = 0.9                  # 0 = no fast EMA (AdEMAMix then keeps no exp_avg)
    beta2: float = 0.999
    beta3: float = 0.9999               # AdEMAMix slow EMA
    alpha: float = 8.0                  # AdEMAMix weight of the slow EMA
    ademamix_warmup: int = 100_000      # steps over which alpha and beta3 warm up
    eps: float = 1e-8
    weight_decay: float = 0.1           # not on norms or xIELU scalars (their Role says so)
    grad_clip: float = 0.1              # global gradient norm (0 = off)
    goldfish: bool = True               # Goldfish loss (drops about 1/k of the tokens from the loss)
    goldfish_k: int = 50
    goldfish_h: int = 50
    sample_tokens: int = 200            # tokens sampled at the end (0 = none)
    async_checkpoint: bool = False      # the loop waits only for a copy to host memory; a thread writes
    on_save_error: str = "stop"         # a failed save (full disk...): stop, or retry at the next interval
    hang_timeout_s: float = 0.0         # no step completed in this time: print every stack, exit 1 (0 = off)
    init_from: str = ""                 # an HF Apertus directory or a ckpt-N to start from (ignored on resume)
    export_hf: bool = False             # write <out_dir>/hf (Hugging Face format) at the end
    export_hf_every: int = 0            # ... and every this many steps (0 = only at the end)
    tensorboard: bool = False           # metrics.jsonl's scalars as TensorBoard events in <out_dir>/tb too (extra `track`)
    wandb_project: str = ""             # ... and to this W&B project (extra `track`; mode from WANDB_MODE)
    spike_guard: bool = False           # re-run a step whose loss spikes, skip its batch if it repeats (SpikeGuard)
    spike_window: int = 128             # N: applied steps whose losses the spike score sees (OLMo-core's; README)
    spike_sigma: float = 6.0            # k: a spike is above their mean + k std (OLMo-core's: ~1e-9 false alarms a step)
    spike_max_faults: int = 3           # M: re-runs that disagree (hardware faults) before the run stops, exit 1
    objective: str = "lm"               # lm (pretraining, SFT), or dpo or qrpo on pairs (batch sizes count pairs)
    beta: float = 0.1                   # dpo, qrpo: the pull towards the reference (the initial weights)
    length_normalize: bool = False      # dpo, qrpo: beta / |y| for each completion y (Apertus' QRPO)
    beta_max: float = 0.1               # qrpo: each completion's beta clamped at this (Apertus; 0 = no clamp)

    def __post_init__(self):
        for key, allowed in (("device", ("auto", "cpu", "cuda")), ("dtype", ("bfloat16", "float32")),
                             ("optimizer", ("ademamix", "adamw")), ("decay_shape", ("1-sqrt", "linear")),
                             ("on_save_error", ("stop", "retry")), ("objective", ("lm", "dpo", "qrpo"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"train.{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")

SECTIONS = {"model": ModelConfig, "data": data.DataConfig, "train": TrainConfig,
            "parallel": parallel.ParallelConfig}

class ConfigError(Exception):
    pass

# ----------------------------------------------------------------------------- configuration
def _check_type(section, key, value, types):
    if key not in types:
        raise ConfigError(f"unknown key {section}.{key} (known: {', '.join(types)})")
    allowed = typing.get_args(types[key]) or (types[key],)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if dict in allowed and value is False:
        return None  # `rope_scaling = false`
    if any(isinstance(value, t) and not (t is int and isinstance(value, bool)) for t in allowed if t is not type(None)):
        return value
    names = "/".join(t.__name__ for t in allowed if t is not type(None))
    raise ConfigError(f"{section}.{key} must be {names}, got {value!r}")

def load_config(path, overrides=()):
    """TOML file + --section.key=value overrides -> {section: dataclass}, and "model_keys": the [model] keys given
    (checkpoint.init_from_config holds them to train.init_from's architecture). Errors name the key."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    for o in overrides:
        if not o.startswith("--") or "=" not in o or "." not in o.split("=")[0]:
            raise ConfigError(f"cannot read {o!r}: overrides are --section.key=value")
        key, value = o[2:].split("=", 1)
        section, name = key.split(".", 1)
        try:
            value = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            pass  # a bare string
        raw.setdefault(section, {})[name] = value
    for section in raw:
        if section not in SECTIONS:
            raise ConfigError(f"unknown section [{section}] (known: {', '.join(SECTIONS)})")
    out = {}
    for section, cls in SECTIONS.items():
        types = {f.name: f.type for f in fields(cls)}
        values = {k: _check_type(section, k, v, types) for k, v in raw.get(section, {}).items()}
        try:
            out[section] = cls(**values)
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e)) from None
    out["model_keys"] = sorted(raw.get("model", {}))
    return out

# ----------------------------------------------------------------------------- the recipe
OPT_CHUNK = 2**26  # elements per foreach batch: the update's temporaries stay at 2 x 256 MB in fp32

def _foreach_batches(tensors, lists, max_elements=OPT_CHUNK):
    """Parameters (and their gradients and moments, listed alike) cut into views of at most max_elements, grouped
    into batches of about max_elements: a foreach op's temporaries are the size of a batch, not of the model."""
    batches, cur, size = [], None, 0
    for i, t in enumerate(tensors):
        for s in range(0, t.numel(), max_elements):
            if cur is None or size >= max_elements:
                cur, size = [[] for _ in lists], 0
                batches.append(cur)
            for out, lst in zip(cur, lists):
                out.append(lst[i].view(-1)[s:s + max_elements])
            size += min(max_elements, t.numel() - s)
    return batches

def _moments_and_groups(params, weight_decay, names):
    """The optimizer state, {moment name: [a zero tensor per parameter]}, and the update's work list,
    {weight decay: foreach batches of (param, grad, *moments) views}."""
    state = {k: [torch.zeros_like(p) for p in params] for k in names}
    groups = {}
    for wd in sorted(set(weight_decay)):
        idx = [i for i, w in enumerate(weight_decay) if w == wd]
        lists = [[params[i] for i in idx], [params[i].grad for i in idx], *([state[k][i] for i in idx] for k in names)]
        groups[wd] = _foreach_batches(lists[0], lists)
    return state, groups

class AdEMAMix:
    """AdEMAMix (Pagliardini et al. 2024, arXiv 2409.03137), as apple/ml-ademamix (pytorch/ademamix.py):
        m1 = b1 m1 + (1-b1) g;  m2 = b3(t) m2 + (1-b3(t)) g;  v = b2 v + (1-b2) g^2
        p -= lr * ((m1 / (1-b1^t) + alpha(t) m2) / (sqrt(v) / sqrt(1-b2^t) + eps) + wd p)
    The slow EMA m2 is not bias-corrected. alpha warms up linearly over `warmup` steps, beta3 linearly in half-life
    from beta1 (half-life of b: log(0.5) / log(b + 1e-8) - 1, upstream's eps inside the log). With beta1 = 0 the fast
    EMA is the gradient itself and is not stored. params: fp32 tensors with .grad (the ZeRO-1 master pieces);
    weight_decay: one value per tensor. State for checkpoints: `steps` (a Python int, exact at any count; the first
    update is step 1) and moments(i) -> {name: tensor} (exp_avg, exp_avg_slow, exp_avg_sq)."""

    def __init__(self, params, weight_decay, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=8.0, warmup=None, eps=1e-8):
        self.betas, self.alpha, self.warmup, self.eps, self.lr, self.steps = betas, alpha, warmup, eps, lr, 0
        names = ("exp_avg", "exp_avg_slow", "exp_avg_sq") if betas[0] != 0 else ("exp_avg_slow", "exp_avg_sq")
        self.state, self.groups = _moments_and_groups(params, weight_decay, names)

    def moments(self, i):
        return {k: v[i] for k, v in self.state.items()}

    @staticmethod
    def schedules(t, b1, b3, alpha, warmup):
        """alpha(t) and beta3(t) of apple/ml-ademamix's linear_warmup_scheduler and
        linear_hl_warmup_scheduler (constant from step `warmup` on)."""
        if not warmup or t >= warmup:
            return alpha, b3
        a = t / warmup
        half_life = lambda b: math.log(0.5) / math.log(b + 1e-8) - 1
        return a * alpha, math.pow(0.5, 1 / ((1 - a) * half_life(b1) + a * half_life(b3) + 1))

    @torch.no_grad()
    def step(self, lr=None):
        lr = self.lr if lr is None else lr
        self.steps += 1
        t = self.steps
        b1, b2, b3 = self.betas
        alpha, b3 = self.schedules(t, b1, b3, self.alpha, self.warmup)
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        for wd, batches in self.groups.items():
            for p, g, *moments in batches:
                m1, m2, v = moments if b1 != 0 else (g, *moments)
                if b1 != 0:
                    torch._foreach_lerp_(m1, g, 1 - b1)
                torch._foreach_lerp_(m2, g, 1 - b3)
                torch._foreach_mul_(v, b2)
                torch._foreach_addcmul_(v, g, g, value=1 - b2)
                denom = torch._foreach_sqrt(v)
                torch._foreach_div_(denom, math.sqrt(bc2))
                torch._foreach_add_(denom, self.eps)
                upd = torch._foreach_div(m1, bc1)
                torch._foreach_add_(upd, m2, alpha=alpha)
                torch._foreach_div_(upd, denom)
                if wd:
                    torch._foreach_add_(upd, p, alpha=wd)
                torch._foreach_add_(p, upd, alpha=-lr)

class AdamW:
    """AdamW (Loshchilov & Hutter), the update of torch.optim.AdamW, with the same state interface as
    AdEMAMix: p *= 1 - lr wd;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
    p -= lr (m / (1-b1^t)) / (sqrt(v) / sqrt(1-b2^t) + eps)."""

    def __init__(self, params, weight_decay, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        self.betas, self.eps, self.lr, self.steps = betas, eps, lr, 0
        self.state, self.groups = _moments_and_groups(params, weight_decay, ("exp_avg", "exp_avg_sq"))

    moments = AdEMAMix.moments

    @torch.no_grad()
    def step(self, lr=None):
        lr = self.lr if lr is None else lr
        self.steps += 1
        b1, b2 = self.betas
        bc1, bc2 = 1 - b1 ** self.steps, 1 - b2 ** self.steps
        for wd, batches in self.groups.items():
            for p, g, m, v in batches:
                if wd:
                    torch._foreach_mul_(p, 1 - lr * wd)
                torch._foreach_lerp_(m, g, 1 - b1)
                torch._foreach_mul_(v, b2)
                torch._foreach_addcmul_(v, g, g, value=1 - b2)
                denom = torch._foreach_sqrt(v)
                torch._foreach_div_(denom, math.sqrt(bc2))
                torch._foreach_add_(denom, self.eps)
                torch._foreach_addcdiv_(p, m, denom, value=-lr / bc1)

def make_optimizer(t: TrainConfig):
    """(roles, tensors) -> the optimizer: weight decay where the parameter's Role asks for it (not norms, xIELU)."""
    def build(roles, tensors):
        wd = [t.weight_decay if r.weight_decay else 0.0 for r in roles]
        if t.optimizer == "adamw":
            return AdamW(tensors, wd, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
        return AdEMAMix(tensors, wd, lr=t.lr, betas=(t.beta1, t.beta2, t.beta3), alpha=t.alpha,
                        warmup=t.ademamix_warmup, eps=t.eps)
    return build

def wsd_lr(step, max_lr, min_lr, warmup_steps, decay_start, decay_steps, shape="1-sqrt"):
    """Warmup-stable-decay: linear warmup from 0, constant, then a cooldown to min_lr that can start
    at any step (so a cooldown can branch off any checkpoint). `step` counts from 0."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if decay_steps <= 0 or step < decay_start:
        return max_lr
    frac = min((step - decay_start) / decay_steps, 1.0)
    return min_lr + (max_lr - min_lr) * (1 - (math.sqrt(frac) if shape == "1-sqrt" else frac))

_GOLDFISH_TABLE = {}  # device -> the table, made once (not copied to the device at every micro-step)

def goldfish_mask(labels, k=50, h=50):
    """Goldfish loss (Hans et al. 2024), exactly as the Apertus data pipeline: True where the label is dropped from
    the loss. Each window of h labels is hashed (their int64 product, which wraps around, modulo 1,000,003) into a
    fixed random table; the window's decision applies to its last label; the first h-1 labels of a sequence are
    never dropped. labels: [T] or [B, T]."""
    if labels.device not in _GOLDFISH_TABLE:
        table = torch.rand(1_000_003, generator=torch.Generator().manual_seed(2971215073))
        _GOLDFISH_TABLE[labels.device] = table.to(labels.device)
    table = _GOLDFISH_TABLE[labels.device]
    rows = labels.reshape(-1, labels.shape[-1])  # [B, T]
    drop = torch.zeros(rows.shape, dtype=torch.bool, device=labels.device)
    if rows.shape[1] >= h:
        keys = rows.long().unfold(1, h, 1).prod(dim=-1) % 1_000_003  # [B, T-h+1]
        drop[:, h - 1:] = table[keys] < 1 / k
    return drop.view(labels.shape)

def loss_mask(x, y, t: TrainConfig, eos_id):
    """Tokens that count: not where the INPUT is EOS (Megatron's eod-mask-loss), nor Goldfish-dropped."""
    mask = x != eos_id
    return mask & ~goldfish_mask(y, t.goldfish_k, t.goldfish_h) if t.goldfish else mask

def dpo_loss(logps, ref_logps, lengths, beta, length_normalize=False):
    """DPO (Rafailov et al. 2023, arXiv 2305.18290; TRL's dpo_loss) per pair. logps, ref_logps, lengths [P, 2]:
    log pi(y|x), log pi_ref(y|x) and |y| (masked tokens) of the chosen c and the rejected r completion:
        margin = b_c (log pi(c) - log pi_ref(c)) - b_r (log pi(r) - log pi_ref(r)),  loss = -log sigmoid(margin)
    b = beta, or beta / |y| length-normalised. Returns (losses [P], margins [P]: the implied reward margin)."""
    r = (beta / lengths.double() if length_normalize else beta) * (logps - ref_logps)
    return -torch.nn.functional.logsigmoid(r[:, 0] - r[:, 1]), r[:, 0] - r[:, 1]

def qrpo_loss(logps, ref_logps, lengths, rewards, ref_rewards, beta, length_normalize=False, beta_max=0.1):
    """QRPO (Matrenok, Moalla and Gulcehre 2025, arXiv 2507.08068; Apertus' qrpo_loss) per pair: logps,
    ref_logps, lengths as dpo_loss's, rewards [P, 2] R(y), ref_rewards [P, n] the rewards of the reference
    model's completions of the prompt (NaN-padded where a prompt has fewer). For each completion y:
        R_q(y) = (number of ref_rewards <= R(y)) / n,   log Z = log(b (exp(1/b) - 1)),
        l(y)   = (R_q(y) - b log Z - b (log pi(y) - log pi_ref(y)))^2,   loss = (l(c) + l(r)) / 2
    b = beta, or beta / |y| length-normalised, then clamped at beta_max (Apertus' code: 0.1, "otherwise grad
    norm is too high"; 0 = no clamp). Returns (losses [P], margins [P] as dpo_loss's, R_q [P, 2])."""
    b = (beta / lengths.double() if length_normalize else torch.full_like(lengths, beta, dtype=torch.float64))
    b = b.clamp(max=beta_max or math.inf)
    rq = (ref_rewards[:, None] <= rewards[..., None]).double().sum(-1) / (~ref_rewards.isnan()).sum(-1, keepdim=True)
    # log Z exactly, without the overflow of exp(1/b) at small b: this replaces Apertus' approximation
    # b log Z ~ b log b + 1 (used for b <= 0.2; off by less than 5e-6 below the clamp at 0.1)
    log_z = torch.log(b) + 1 / b + torch.log1p(-torch.exp(-1 / b))
    r = b * (logps - ref_logps)
    return ((rq - b * log_z - r) ** 2).mean(1), r[:, 0] - r[:, 1], rq

PEAK_BF16_FLOPS = {"H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H800": 989e12, "GH200": 989e12,
                   "H200": 989e12, "H200 NVL": 835e12, "A100": 312e12, "A800": 312e12, "B200": 2250e12,
                   "GB200": 2500e12, "L40S": 362e12}  # dense bf16 (no sparsity) per GPU, NVIDIA's datasheets

def peak_flops(device):
    """The GPU's dense bf16 peak, looked up by its name, the longest matching key first ("H100 PCIe" before "H100",
    "GH200" before "H200"); None when unknown (MFU is then null)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((PEAK_BF16_FLOPS[k] for k in sorted(PEAK_BF16_FLOPS, key=len, reverse=True) if k in name), None)

# ----------------------------------------------------------------------------- the run
def build(cfg, grid, device):
    """The model, on the meta device first, cut to this pipeline stage, tensor-parallelised, then materialised and
    initialised from one seed (each full tensor drawn, this rank's slice kept): every layout starts equal."""
    t = cfg["train"]
    with torch.device("meta"):
        model = Apertus(cfg["model"])
    parallel.keep_stage(model, grid)
    parallel.parallelize(model, grid)
    model.to_empty(device=device)
    model.init_weights(t.seed, lambda role, full: parallel.tp_slice(full, role, grid))
    model.to(torch.bfloat16 if device.type == "cuda" and t.dtype == "bfloat16" else torch.float32)
    model.attn_backend = "flex" if device.type == "cuda" else "sdpa"
    model.activation_checkpointing = t.activation_checkpointing
    if t.compile:
        model.compile_blocks()
    return model

def log(grid, *args):
    if grid.rank == 0:
        print(*args, flush=True)

def all_sum(x, *groups, op=torch.distributed.ReduceOp.SUM):
    """Sum x (or reduce it by op) over the given process groups (None or a group of one: nothing to do)."""
    for g in groups:
        if g is not None:
            torch.distributed.all_reduce(x, op=op, group=g)
    return x

def micro_loss(model, x, y, mask, n_tokens, hidden=None, chunk=None, cp_index=None, pairs=None):
    """One micro-batch on this rank's stage: its share of the global mean loss (the last stage), or the activations
    for the next stage. Under context parallelism x, y and mask are the whole sequences and the model runs the
    tokens at cp_index. pairs: the share from the rows' summed losses [B] (pair_loss)."""
    doc = document_ids(x, model.config.eos_token_id, model.config.bos_token_id)
    out = model(x, y, mask, doc, "sequence" if pairs else "sum", hidden=hidden, cp_index=cp_index, chunk=chunk)
    return out if out.dim() > 1 else pairs(out) if pairs else out / n_tokens  # activations, or the loss

def pair_loss(b, mask, t, sums, cp_group, out):
    """Micro-batch b of whole pairs (rows 2i chosen, 2i + 1 rejected), out [B] its rows' summed losses: its
    pairs' losses over the global batch's pairs; margins, accuracy (a tie: half) and quantile rewards go to
    sums. Without b.ref_logps (in the reference pass) these log-probabilities become b.ref_logps."""
    out = parallel.AllReduce.apply(out, cp_group, True) if cp_group else out  # CP: every rank's part of each row
    logps, lengths = -out.view(-1, 2), mask.view(-1, 2, mask.shape[1]).sum(-1)  # [P, 2]: chosen, rejected
    b.ref_logps = logps.detach().double() if b.ref_logps is None else b.ref_logps
    ref, r, norm = b.ref_logps.to(out.device), b.rewards.to(out.device), t.length_normalize
    if t.objective == "qrpo":
        losses, margins, quantiles = qrpo_loss(logps, ref, lengths, r[:, :2], r[:, 2:], t.beta, norm, t.beta_max)
    else:
        (losses, margins), quantiles = dpo_loss(logps, ref, lengths, t.beta, norm), ref * 0
    sums += torch.stack([margins.sum(), (margins > 0).sum() + (margins == 0).sum() / 2, quantiles.mean(1).sum()])
    return losses.sum() / t.global_batch_size

def forward_backward(model, opt, batches, t, grid, train=True, stats=None):
    """One global batch on this rank: the micro-batches' losses summed and normalised by the number of tokens that
    count in the WHOLE global batch (pairs: of its pairs), so that the gradient does not depend on the layout or the
    micro-batch split. Returns the global mean loss (a float: one host sync per step), the seconds this pipeline stage
    spent waiting for its neighbours, and the seconds of this rank's own work (a straggler shows there)."""
    cfg, pairs = model.config, t.objective != "lm"
    moved = [[None if v is None else v.to(grid.device, non_blocking=True) for v in (b.x, b.y, b.loss_mask)]
             for b in batches]
    if pairs:  # a pair's loss is over its completions' tokens (their packed mask): no Goldfish, no token count
        masks, n_tokens = [packed for *_, packed in moved], None
    else:
        masks = [loss_mask(x, y, t, cfg.eos_token_id) if train else x != cfg.eos_token_id for x, y, _ in moved]
        # a packed source (chat data) brings its own loss mask: only the assistant's tokens count
        masks = [m if packed is None else m & packed for m, (_, _, packed) in zip(masks, moved)]
        # under CP every rank holds whole sequences: the masks (Goldfish's windows too) and count are one process's
        n_tokens = all_sum(sum(m.sum() for m in masks).float(), grid.dp_group)
    B, T = moved[0][0].shape
    index = parallel.cp_positions(T, grid.cp, grid.cp_rank, grid.device) if grid.cp > 1 else None
    # pairs: a micro-batch holds whole pairs, each pair's loss where both its sequences are, under their loss mask
    sums = torch.zeros(3, dtype=torch.float64, device=grid.device) if pairs else None
    steps = [functools.partial(micro_loss, model, x, y, m, n_tokens, cp_index=index,
                               pairs=pairs and functools.partial(pair_loss, b, m, t, sums, grid.cp_group))
             for b, (x, y, _), m in zip(batches, moved, masks)]
    t0 = time.perf_counter()
    if grid.pp > 1:  # every stage reads the same batch; the first uses the tokens, the last the targets
        sp = grid.tp if grid.sequence_parallel else 1
        pipe = parallel.Pipe(grid, (B, T // (grid.cp * sp), cfg.hidden_size), next(model.parameters()).dtype)
        schedule = parallel.pipeline_1f1b if grid.virtual_stages == 1 else parallel.pipeline_interleaved
        total, _ = schedule(steps, pipe, opt, train)
        waited, groups = pipe.wait_s, (grid.dp_cp_group, grid.pp_group)
    else:
        total, waited, groups = torch.zeros((), device=grid.device), 0.0, (grid.dp_cp_group,)
        for i, step in enumerate(steps):
            opt.sync = i == len(steps) - 1  # only the last micro-step's backward reduces the buckets
            loss = step()
            if train:
                loss.backward()
            total += loss.detach()
    parallel.wait_for_stream(grid.device)
    busy = time.perf_counter() - t0 - waited
    if pairs:  # the pairs' means (every CP rank has all its pairs): a step's, or summed over evaluations
        sums = (all_sum(sums, *groups) / (t.global_batch_size * grid.cp)).tolist()
        stats = {} if stats is None else stats
        for k, v in zip(("margin", "accuracy", "quantile_reward")[:2 + (t.objective == "qrpo")], sums):
            stats[k] = v + (0.0 if train else stats.get(k, 0.0))
    return all_sum(total, *groups).item() / (grid.cp if pairs else 1), waited, busy

def train_step(model, opt, batches, lr, t, grid, guard=None, stats=None):
    """Forward and backward over the global batch, then the update: forward_backward's (loss, waited, busy) with the
    gradient norm second. A non-finite loss or gradient skips the update; with the guard, a second try (SpikeGuard)."""
    for _ in range(2 if guard else 1):
        loss, waited, busy = forward_backward(model, opt, batches, t, grid, stats=stats)
        applied = not guard.suspicious(loss) if guard else math.isfinite(loss)
        norm = opt.step(lr, t.grad_clip).item() if applied else opt.skip_step() or float("nan")
        parallel.wait_for_stream(grid.device)  # the step's own work, not the parameter all-gathers beside it
        if math.isfinite(norm):  # opt.step skips a non-finite gradient too
            break
    return loss, norm, waited, busy

class SpikeGuard:
    """train.spike_guard: Megatron-LM's re-run of a suspicious step, scored as OLMo-core scores spikes (a loss
    above mean + k std of the last N applied steps' losses; the window restarts with each data stage). A step is
      normal      finite loss and gradient norm, the loss under that bar (or the window not full): applied;
      suspicious  else: its gradients dropped, the same batch computed again, then
        data        the same loss (to the bit on CPU, within tol on CUDA), not normal again: the batch is
                    skipped for good, its step number used up, and named;
        hardware    else, a fault: the re-run applied if normal, else the batch skipped; M faults stop the run.
    The window and the skipped batches go into meta.json; the loss is all-reduced, so every rank decides alike."""

    def __init__(self, t, grid, stage_starts, state=None):
        self.t, self.starts, self.tries, self.faults = t, set(stage_starts), [], 0
        self.tol = 1e-3 if grid.device.type == "cuda" else 0.0  # Megatron-LM's bound for a non-deterministic backward
        self.state = state or {"losses": [], "skipped": []}  # replaced, never changed: an async save may read it

    def suspicious(self, loss):
        self.tries.append(loss)
        w = torch.tensor(self.state["losses"][-self.t.spike_window:], dtype=torch.float64)  # [<= N]
        bar = (w.mean() + self.t.spike_sigma * w.std()).item() if len(w) >= max(self.t.spike_window, 2) else math.inf
        return not math.isfinite(loss) or loss > bar

    def judge(self, step, norm, loader, grid):
        """After step `step` (train_step's tries, its gradient norm): its case, as metrics.jsonl's fields."""
        (first, *again), self.tries, applied = self.tries, [], math.isfinite(norm)
        losses = (self.state["losses"] + (again or [first]))[-self.t.spike_window:] if applied else self.state["losses"]
        self.state = dict(self.state, losses=[] if step in self.starts else losses)
        if not again:
            return {}
        again, say = again[0], f"step {step}: loss {first:.4f} (or its gradients) suspicious, {again[0]:.4f} on a re-run"
        same = abs(first - again) <= self.tol * abs(first) or not (math.isfinite(first) or math.isfinite(again))
        if not applied and same:
            samples = loader.samples(step - 1)
            self.state = dict(self.state, skipped=self.state["skipped"] + [{"step": step, "samples": samples}])
            log(grid, f"{say}: the data, batch skipped for good; its samples {json.dumps(samples)}")
            return {"spike": "data", "spike_loss": first, "skipped_samples": samples}
        self.faults += 1
        log(grid, f"{say}: a hardware fault ({self.faults} of {self.t.spike_max_faults}), "
                  f"{'the re-run applied' if applied else 'batch skipped'}")
        return {"spike": "hardware", "spike_loss": first}

class HardwareFault(RuntimeError):
    pass

@torch.no_grad()
def evaluate(model, loader, n_batches, t, grid, opt, stats=None):
    """{source name: mean loss over n_batches global batches of its held-out samples} (pairs: stats)."""
    model.eval()
    losses = {name: sum(forward_backward(model, opt, loader.val_batches(s, i), t, grid, False, stats=stats)[0]
                        for i in range(n_batches)) / n_batches for s, name in enumerate(loader.source_names)}
    model.train()
    return losses

@torch.no_grad()
def reference_pass(model, loader, t, grid, opt, eval_batches):
    """The initial weights' log-probabilities of the pairs of steps 1 ... max_steps and of the validation batches,
    before step 1 (once the weights move, the reference is gone), each rank for its own micro-batches; kept in out_dir
    keyed by pair (reference_logps.npz, {source name: float64 [pairs, 2]}): a run that finds it uses it, any layout."""
    path = os.path.join(t.out_dir, "reference_logps.npz")
    saved = np.load(path) if os.path.exists(path) else None
    tables = dict(enumerate(np.full((len(s.rewards), 2), np.nan) if saved is None else saved[s.name] for s in loader.sources))
    todo = [] if saved is not None else [functools.partial(loader.get_batch, k) for k in range(t.max_steps)] + [
        functools.partial(loader.val_batches, i, k) for i in range(len(loader.sources)) for k in range(eval_batches)]
    for get in tqdm(todo, desc="reference log-probabilities", disable=grid.rank != 0 or not todo):
        forward_backward(model, opt, batches := get(), t, grid, train=False)  # the last stage fills b.ref_logps
        for b in batches if grid.last_stage else ():
            for s, k, v in zip(b.source[::2].tolist(), b.sample[::2].tolist(), b.ref_logps.tolist()):
                tables[s][k] = v
    for table in tables.values() if todo else ():  # every pair, from the rank that computed it
        v = torch.from_numpy(np.nan_to_num(table, nan=np.inf)).to(grid.device)
        v = all_sum(v, grid.dp_group, grid.pp_group, op=torch.distributed.ReduceOp.MIN).cpu().numpy()
        table[:] = np.where(np.isinf(v), np.nan, v)
    if todo and grid.rank == 0:  # written whole, then renamed
        np.savez(path + ".tmp.npz", **{s.name: tables[i] for i, s in enumerate(loader.sources)})
        os.replace(path + ".tmp.npz", path)
    loader.reference = tables

def sample(model, tok, t, device):
    """A few tokens from the trained model (one process). Eager, with SDPA: every new length would be a new shape
    for the compiled blocks and the FlexAttention mask."""
    model.eval()
    backend, model.attn_backend = model.attn_backend, "sdpa"
    prompt = torch.tensor([[tok.bos_id] + tok.encode("def ")], device=device)
    torch.manual_seed(t.seed)
    try:
        with torch.compiler.set_stance("force_eager"):
            return tok.decode(model.generate(prompt, t.sample_tokens, temperature=0.8, top_k=50)[0].tolist())
    finally:
        model.attn_backend = backend

def check_layout(cfg, world, dp=None):
    """parallel.check_layout of the config's layout on `world` processes (dp: world / (tp x cp x pp))."""
    m, t, p = cfg["model"], cfg["train"], cfg["parallel"]
    parallel.check_layout(m, world, p.tp, dp, t.global_batch_size, t.micro_batch_size, cfg["data"].seq_len,
                          p.sequence_parallel, p.pp, p.cp, p.virtual_stages)

def setup(cfg):
    """Before the first step: the architecture (train.init_from's, if set), the grid, data, model and optimizer."""
    t, dcfg, p = cfg["train"], cfg["data"], cfg["parallel"]
    for key, package in (("tensorboard", "tensorboard"), ("wandb_project", "wandb")):  # every rank: all stop
        if getattr(t, key) and importlib.util.find_spec(package) is None:
            raise ConfigError(f"train.{key} needs the {package} package: pip install -e \".[track]\"")
    if t.init_from:
        cfg["model"] = checkpoint.init_from_config(t.init_from, t.out_dir, cfg["model"], cfg["model_keys"])
    mcfg = cfg["model"]
    device_type = t.device if t.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    check_layout(cfg, parallel.env_rank()[1])
    grid = parallel.init_distributed(p, device_type)
    torch.manual_seed(t.seed * 1_000_003 + grid.rank)  # each rank's own stream, the same in every run
    tok = prepare.get_tokenizer(dcfg.tokenizer)
    if tok.vocab_size > mcfg.vocab_size:
        raise ConfigError(f"tokenizer {dcfg.tokenizer} has {tok.vocab_size} ids, model.vocab_size is {mcfg.vocab_size}")
    # rank 0 first: a demo corpus ("demo:..." prefixes, or no dataset at all) is prepared once, by it
    if grid.rank != 0:
        torch.distributed.barrier()
    stages = data.stage_table(dcfg, t.global_batch_size, lambda prefix: prepare.resolve_prefix(prefix, dcfg.tokenizer))
    if grid.rank == 0 and grid.world > 1:
        torch.distributed.barrier()
    loader = data.DataLoader(stages, dcfg.seq_len, t.global_batch_size, t.micro_batch_size, grid.dp_rank, grid.dp,
                             t.seed, mcfg.vocab_size, dcfg.val_fraction, tok.vocab_size, t.objective != "lm")
    if t.objective == "qrpo" and any(s.rewards.lengths(0, 1)[0] < 3 for s in loader.sources):  # all pairs or none
        raise ConfigError('train.objective = "qrpo" needs rewards and ref_rewards, which these pairs lack: use "dpo"')
    model = build(cfg, grid, grid.device)
    opt = parallel.DistributedOptimizer(model, grid, make_optimizer(t), p.bucket_size)
    return grid, tok, loader, model, opt

def start(cfg, grid, opt, loader):
    """Where the run begins: the newest good checkpoint in out_dir (verified; a bad one is skipped), else the weights
    of init_from, else the seeded init. The resolved config is printed and saved as config.json. Returns (step, meta):
    what every checkpoint records beside the weights (export_dtype: the dtype the weights came in)."""
    t = cfg["train"]
    config = {s: asdict(cfg[s]) for s in SECTIONS}
    log(grid, f"config:\n{json.dumps(config, indent=2)}")
    os.makedirs(t.out_dir, exist_ok=True)
    if grid.rank == 0:
        with open(os.path.join(t.out_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    step, export_dtype, path = 0, t.dtype, checkpoint.find_resume(t.out_dir, grid)
    if path:
        step, meta, nbytes = checkpoint.load_checkpoint(path, opt, grid, t.optimizer)
        say, export_dtype = f"resumed from {path} at step {step}", meta.get("export_dtype", t.dtype)
        # the blend's position: without it (or from another [data] table) the loader recomputes it, slowly
        if meta.get("data_state") is not None and not loader.load_state(meta["data_state"]):
            log(grid, "the checkpoint's data position was made with another [data] table or batch size: recomputing it")
    elif t.init_from:
        nbytes, export_dtype = checkpoint.load_init_from(opt, t.init_from, grid)
        say = f"initialised from {t.init_from}"
    if path or t.init_from:
        lo, hi, total = across_ranks(nbytes / 1e6, grid)
        log(grid, f"{say} (read {lo:.1f} to {hi:.1f} MB per rank, {total:.1f} MB in all)")
    log(grid, f"{param_count(cfg['model']):,} parameters, layout tp={grid.tp} cp={grid.cp} pp={grid.pp} dp={grid.dp}, "
              f"device {grid.device}, {t.global_batch_size // (grid.dp * t.micro_batch_size)} micro-batches of "
              f"{t.micro_batch_size} per rank per step")
    return step, dict(config=config, optimizer=t.optimizer, export_dtype=export_dtype,
                      spike_guard=path and meta.get("spike_guard"))  # the spike guard's window and skipped batches

def across_ranks(x, grid):
    """(min, max, sum) of a float over all ranks."""
    mm = torch.tensor([-x, x], dtype=torch.float64, device=grid.device)
    sm = torch.tensor([x], dtype=torch.float64, device=grid.device)
    if grid.world > 1:
        torch.distributed.all_reduce(mm, op=torch.distributed.ReduceOp.MAX)
        torch.distributed.all_reduce(sm)
    return -mm[0].item(), mm[1].item(), sm.item()

class Metrics:
    """metrics.jsonl (rank 0, appended, one line per logged step and per step that evaluates or saves) and
    the progress bar. tokens/s and MFU time the step alone, never an evaluation or a save."""

    def __init__(self, cfg, grid, loader, step, config):
        t, mcfg, seq_len = cfg["train"], cfg["model"], cfg["data"].seq_len
        self.t, self.grid, self.loader = t, grid, loader
        self.tokens = t.global_batch_size * seq_len * (1 if t.objective == "lm" else 2)  # a pair: two sequences
        self.flops, self.peak = flops_per_token(mcfg, seq_len), peak_flops(grid.device)
        self.file = open(os.path.join(t.out_dir, "metrics.jsonl"), "a") if grid.rank == 0 else None
        self.bar = tqdm(total=t.max_steps, initial=step, desc="train", dynamic_ncols=True) if grid.rank == 0 else None
        self.tb = self.wandb = None
        if t.tensorboard and grid.rank == 0:  # purge_step: a resume hides what a crashed run logged past it
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(t.out_dir, "tb"), purge_step=step or None)
        if t.wandb_project and grid.rank == 0:  # WANDB_MODE=offline on a cluster; a restart resumes the same run
            import wandb
            id_file = os.path.join(t.out_dir, "wandb_id")
            if not os.path.exists(id_file):
                open(id_file, "w").write(os.urandom(6).hex())
            self.wandb = wandb.init(project=t.wandb_project, id=open(id_file).read(), resume="allow", dir=t.out_dir,
                                    name=t.out_dir, config=config)

    def step(self, step, loss, norm, lr, seconds, waited, busy):
        """The record of a step that has just ended (a non-finite one is said: its update was skipped)."""
        grid = self.grid
        if not self.t.spike_guard and not (math.isfinite(loss) and math.isfinite(norm)):  # the guard says its own
            log(grid, f"step {step}: {'loss' if not math.isfinite(loss) else 'gradient norm'} is not finite, update skipped")
        record = dict(step=step, loss=loss, lr=lr, grad_norm=norm, tokens_per_sec=round(self.tokens / seconds, 1),
                      mfu=round(self.flops * self.tokens / seconds / (self.peak * grid.world), 4) if self.peak else None)
        if grid.device.type == "cuda":
            record["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(grid.device) / 1e9, 2)
        if grid.pp > 1:  # the fraction of the step this stage sat waiting (rank 0: the first stage)
            record["bubble"] = round(waited / seconds, 4)
        if self.logged(step):  # the slowest and the fastest rank's own work in this step: stragglers show
            lo, hi, _ = across_ranks(busy, grid)
            record["step_time_max_s"], record["step_time_min_s"] = round(hi, 4), round(lo, 4)
        record.update({f"tokens/{name}": n for name, n in self.loader.tokens_seen(step).items()})
        if self.bar:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        return record

    def logged(self, step):
        return due(step, self.t.log_interval, self.t)

    def write(self, record):
        if self.file and (self.logged(record["step"]) or {"val_loss", "checkpoint_block_s", "spike"} & record.keys()):
            print(json.dumps(record), file=self.file, flush=True)
            scalars = {k: v for k, v in record.items() if type(v) in (int, float) and k != "step"}
            for k, v in scalars.items() if self.tb else ():
                self.tb.add_scalar(k, v, record["step"])
            if self.wandb:
                self.wandb.log(scalars, step=record["step"])

    def close(self):
        for closing in (self.bar, self.file, self.tb):
            if closing:
                closing.close()
        if self.wandb:
            self.wandb.finish()

SIGNALLED = {"name": None}  # the signal handler's only state: the loop reads it after each step

@contextlib.contextmanager
def guarded(t):
    """The loop's guards, set up for a run and undone after it, crash or not: SIGUSR1 (Slurm's warning before the
    time limit) and SIGTERM (torchrun stopping, or scancel) noted in SIGNALLED (the loop finishes the step, saves and
    exits), and the hang watchdog armed from the first step on (a hang in step 1 is caught too)."""
    SIGNALLED["name"] = None
    note = lambda signum, frame: SIGNALLED.update(name=signal.Signals(signum).name)
    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    watchdog(t)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        for sig, handler in previous.items():
            signal.signal(sig, handler)

def watchdog(t):
    """(Re)arm the hang watchdog: if this rank does not come back here within hang_timeout_s, every thread's stack is
    printed and the process exits 1 (srun or torchrun restarts the job). Re-armed after each step, evaluation, save."""
    if t.hang_timeout_s:
        faulthandler.dump_traceback_later(t.hang_timeout_s, exit=True)

def signalled(grid, saver, t):
    """Whether a signal reached any rank, which every rank then knows. A save that failed on any rank is said here,
    by every rank together: the run stops (train.on_save_error = stop) or retries."""
    signal_seen, save_failed = parallel.agree(grid, SIGNALLED["name"] is not None, saver.error is not None)
    if save_failed:
        say = saver.error or "a checkpoint save failed on another rank"
        saver.error = None
        if t.on_save_error == "stop":
            raise SaveError(f"{say}; stopping (train.on_save_error = stop), the previous checkpoints are intact")
        log(grid, f"{say}; the previous checkpoints are intact, retrying at the next interval")
    return signal_seen

def validate(model, loader, step, n_batches, t, grid, opt):
    """The validation part of a step's record: val_loss (the sources weighted as the stage of the last step mixes
    them), val_loss/<source> and, for pairs, val_<stat>."""
    losses = evaluate(model, loader, n_batches, t, grid, opt, stats := {})
    record = {"val_loss": sum(w * losses[n] for n, w in loader.stage_weights(step - 1).items())}
    record.update({f"val_loss/{name}": v for name, v in losses.items()})
    record.update({f"val_{k}": v / (n_batches * len(losses)) for k, v in stats.items()})
    log(grid, f"step {step}: val loss {record['val_loss']:.4f}")
    watchdog(t)
    return record

class SaveError(checkpoint.CheckpointError):
    pass

def save(saver, t, step, opt, grid, meta, loader, signal_seen):
    """A checkpoint of `step` (its files in the background with async_checkpoint). Returns the seconds blocked."""
    if signal_seen:
        log(grid, f"{SIGNALLED['name'] or 'a signal'} received: saving step {step}; until it is complete the newest "
                  f"checkpoint is the previous one")
    blocked = saver.save(step, opt, dict(meta, data_state=loader.state(step)))
    if saver.error is None:  # a failure is said once, by the loop, when every rank knows of it
        log(grid, f"{'saving' if t.async_checkpoint else 'saved'} checkpoint at step {step} ({blocked:.2f} s blocked)")
    watchdog(t)
    return round(blocked, 4)

def wait_for_save(grid, saver):
    """Wait for the save in flight; why it failed, if it did on any rank (every rank learns it: all stop together)."""
    saver.wait()
    failed = parallel.agree(grid, saver.error is not None)[0]
    return (saver.error or "a checkpoint save failed on another rank") if failed else None

def export_hf(t, grid, saver, dtype):
    """<out_dir>/hf from the newest checkpoint, in the dtype the weights came in, with the tokenizer files of
    init_from (when it is still there). Nothing is exported when that checkpoint's save failed (the loop says so)."""
    if wait_for_save(grid, saver):
        return
    error, out = None, os.path.join(t.out_dir, "hf")
    if grid.rank == 0:
        try:
            latest = checkpoint.latest_checkpoint(t.out_dir)
            checkpoint.export_hf(latest, out, dtype, t.init_from)
            log(grid, f"exported {latest} to {out} ({dtype})")
        except (OSError, checkpoint.CheckpointError) as e:
            error = f"export to {out} failed: {e}"
    if parallel.agree(grid, error is not None)[0]:
        raise SaveError(error or "the export failed on rank 0")

def finish(model, tok, t, grid, saver, meta, step, signal_seen, failed):
    """After the loop: a failed last save stops here; else the last line after a signal, or the export and the
    sample after the last step."""
    if failed:
        raise SaveError(f"{failed}; the previous checkpoints are intact")
    if signal_seen:  # the last line says which checkpoint there is; nothing else runs within the grace
        log(grid, f"saved checkpoint at step {step} after {SIGNALLED['name'] or 'a signal'}; exiting "
                  f"(resume with the same command)")
    elif step == t.max_steps:
        if t.export_hf:
            export_hf(t, grid, saver, meta["export_dtype"])
        if t.sample_tokens and grid.world == 1:
            print("sample:\n" + sample(model, tok, t, grid.device))
        elif t.sample_tokens:
            log(grid, f"no sample: the model is split over {grid.world} processes (sample from one process, "
                      f"or from `python checkpoint.py consolidate` of the last checkpoint)")

def due(step, every, t):
    """The last step, or every `every` steps (0: only the last)."""
    return step == t.max_steps or bool(every and step % every == 0)

def run(cfg):
    """The training loop: a batch, a step, its metrics; then, when due, evaluation, a checkpoint and an export.
    Signals and failed saves are agreed on by every rank after each step."""
    t, dcfg = cfg["train"], cfg["data"]
    grid, tok, loader, model, opt = setup(cfg)
    step, meta = start(cfg, grid, opt, loader)
    if t.objective != "lm":
        reference_pass(model, loader, t, grid, opt, dcfg.eval_batches)
    saver = checkpoint.Saver(t.out_dir, grid, t.keep_checkpoints, t.async_checkpoint)
    decay_start = t.decay_start if t.decay_start >= 0 else t.max_steps - t.decay_steps
    signal_seen = False
    guard = SpikeGuard(t, grid, [s[0] for s in loader.stages], meta["spike_guard"]) if t.spike_guard else None
    with guarded(t), contextlib.closing(Metrics(cfg, grid, loader, step, meta["config"])) as metrics:
        while step < t.max_steps:
            t0 = time.perf_counter()
            lr = wsd_lr(step, t.lr, t.min_lr, t.warmup_steps, decay_start, t.decay_steps, t.decay_shape)
            loss, norm, waited, busy = train_step(model, opt, loader.get_batch(step), lr, t, grid, guard, stats := {})
            step += 1
            watchdog(t)
            record = metrics.step(step, loss, norm, lr, time.perf_counter() - t0, waited, busy) | stats
            record.update(guard.judge(step, norm, loader, grid) if guard else {})
            signal_seen = signalled(grid, saver, t)
            if not signal_seen and due(step, t.eval_interval, t):
                record.update(validate(model, loader, step, dcfg.eval_batches, t, grid, opt))
            export = t.export_hf and t.export_hf_every and step % t.export_hf_every == 0 and step != t.max_steps
            if due(step, t.checkpoint_interval, t) or signal_seen or export:
                record["checkpoint_block_s"] = save(saver, t, step, opt, grid, dict(meta, spike_guard=guard and guard.state),
                                                    loader, signal_seen)
            if export:
                export_hf(t, grid, saver, meta["export_dtype"])
                watchdog(t)
            metrics.write(record)
            if guard and guard.faults >= t.spike_max_faults:
                raise HardwareFault(f"{guard.faults} hardware faults, the last at step {step}: a node to drain, then resume")
            if signal_seen:
                break
        failed = wait_for_save(grid, saver)  # the watchdog still armed: a commit that never comes is a hang too
    finish(model, tok, t, grid, saver, meta, step, signal_seen, failed)
    parallel.shutdown(grid, opt)
    return model

def main(argv):
    if "--plan" in argv:  # the memory plan of a layout is plan.py's; this is the same command
        import plan
        return plan.main(argv)
    if not argv or argv[0].startswith("--"):
        print(__doc__)
        return 2
    try:
        run(load_config(argv[0], argv[1:]))
    except (ConfigError, parallel.LayoutError) as e:  # the same on every rank: said once
        if parallel.env_rank()[0] == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except (parallel.LaunchError, SaveError, HardwareFault, data.DataError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)  # LaunchError: this rank's own environment, every rank says it
        return 1 if isinstance(e, (SaveError, HardwareFault)) else 2  # 1: the scheduler counts no success
    return 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
