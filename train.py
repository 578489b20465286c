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
Memory plan of a layout, without allocating anything:
    python train.py configs/apertus-70b.toml --plan --parallel.tp=4 --parallel.pp=8 --parallel.dp=128

Every key of the config can be overridden as --section.key=value. A run directory that holds a
checkpoint is resumed from its newest good one, under any (tp, pp, dp) layout.
"""
import faulthandler
import functools
import json
import math
import os
import shutil
import signal
import sys
import time
import tomllib
import typing
from dataclasses import asdict, dataclass, fields, replace

import torch

import checkpoint
import data
import model as model_py
import parallel
from model import Apertus, ModelConfig, document_ids, flops_per_token, param_count


@dataclass
class TrainConfig:
    """The [train] section."""
    out_dir: str = "out/run"            # checkpoints, metrics.jsonl and config.json go here
    max_steps: int = 1000               # optimizer steps
    global_batch_size: int = 32         # sequences per optimizer step, whatever the layout
    micro_batch_size: int = 8           # sequences per forward/backward on one rank
    log_interval: int = 10              # steps between lines in metrics.jsonl
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
    init_from: str = ""                 # a Hugging Face Apertus directory to start from (ignored on resume)
    export_hf: bool = False             # write <out_dir>/hf (Hugging Face format) at the end
    export_hf_every: int = 0            # ... and every this many steps (0 = only at the end)


SECTIONS = {"model": ModelConfig, "data": data.DataConfig, "train": TrainConfig,
            "parallel": parallel.ParallelConfig}


class ConfigError(Exception):
    pass


# ----------------------------------------------------------------------------- configuration
def _check_type(key, value, typ):
    allowed = typing.get_args(typ) or (typ,)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if dict in allowed and value is False:
        return None  # `rope_scaling = false`
    if any(isinstance(value, t) and not (t is int and isinstance(value, bool)) for t in allowed if t is not type(None)):
        return value
    names = "/".join(t.__name__ for t in allowed if t is not type(None))
    raise ConfigError(f"{key} must be {names}, got {value!r}")


def load_config(path, overrides=()):
    """TOML file + --section.key=value overrides -> {section: dataclass}. Errors name the key."""
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
    out = {}
    for section, raw_section in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown section [{section}] (known: {', '.join(SECTIONS)})")
    for section, cls in SECTIONS.items():
        types = {f.name: f.type for f in fields(cls)}
        values = {}
        for k, v in raw.get(section, {}).items():
            if k not in types:
                raise ConfigError(f"unknown key {section}.{k} (known: {', '.join(types)})")
            values[k] = _check_type(f"{section}.{k}", v, types[k])
        try:
            out[section] = cls(**values)
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e)) from None
    t = out["train"]
    if t.init_from:  # the architecture comes from the Hugging Face config.json; [model] may only agree
        theirs, where = None, checkpoint.latest_checkpoint(t.out_dir)  # a resume does not read init_from: it may be gone
        if where:
            try:
                theirs, where = checkpoint.read_meta(where)[1], os.path.join(where, "meta.json")
            except checkpoint.CheckpointError:
                pass  # the resume will say so and fall back
        if theirs is None:
            try:
                theirs, where = checkpoint.read_hf_config(t.init_from), os.path.join(t.init_from, "config.json")
            except checkpoint.CheckpointError as e:
                raise ConfigError(f"train.init_from: {e}") from None
        for k in raw.get("model", {}):
            mine = getattr(out["model"], k)
            if mine != getattr(theirs, k) and k not in ("init_std",):
                raise ConfigError(f"model.{k} = {mine!r} disagrees with {getattr(theirs, k)!r} in {where}")
        out["model"] = replace(theirs, init_std=out["model"].init_std)
    for key, allowed in (("device", ("auto", "cpu", "cuda")), ("dtype", ("bfloat16", "float32")),
                         ("optimizer", ("ademamix", "adamw")), ("decay_shape", ("1-sqrt", "linear")),
                         ("on_save_error", ("stop", "retry"))):
        if getattr(t, key) not in allowed:
            raise ConfigError(f"train.{key} must be one of {', '.join(allowed)}, got {getattr(t, key)!r}")
    return out


# ----------------------------------------------------------------------------- the recipe
OPT_CHUNK = 2**26  # elements per foreach batch: the update's temporaries stay at 2 x 256 MB in fp32


def _foreach_batches(tensors, lists, max_elements=OPT_CHUNK):
    """Cut parameters (and their gradient and moments, listed alike) into views of at most
    max_elements and group them into batches of about max_elements: foreach ops on a batch allocate
    temporaries the size of the batch, not of the whole model."""
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
    The slow EMA m2 is not bias-corrected. alpha warms up linearly over `warmup` steps, beta3 linearly
    in half-life from beta1 (half-life of b: log(0.5) / log(b + 1e-8) - 1, upstream's eps inside the
    log). With beta1 = 0 the fast EMA is the gradient itself and is not stored. The first update is
    step 1; `steps` is a Python int (exact at any count).

    params: fp32 tensors with .grad (the ZeRO-1 master pieces); weight_decay: one value per tensor.
    State for checkpoints: `steps` and moments(i) -> {name: tensor} (exp_avg, exp_avg_slow, exp_avg_sq)."""

    def __init__(self, params, weight_decay, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=8.0, warmup=None, eps=1e-8):
        self.params, self.betas, self.alpha, self.warmup, self.eps, self.lr = params, betas, alpha, warmup, eps, lr
        self.steps = 0
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
            for batch in batches:
                p, g = batch[0], batch[1]
                m1, (m2, v) = (batch[2], batch[3:]) if b1 != 0 else (g, batch[2:])
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
        self.params, self.betas, self.eps, self.lr, self.steps = params, betas, eps, lr, 0
        self.state, self.groups = _moments_and_groups(params, weight_decay, ("exp_avg", "exp_avg_sq"))

    def moments(self, i):
        return {k: v[i] for k, v in self.state.items()}

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
    """(roles, tensors) -> the optimizer: weight decay where the parameter's Role asks for it
    (matrices; not norms or xIELU scalars)."""
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
    """Goldfish loss (Hans et al. 2024), exactly as the Apertus data pipeline: True where the label is
    dropped from the loss. Each window of h labels is hashed (their int64 product, which wraps around,
    modulo 1,000,003) into a fixed random table; the window's decision applies to its last label; the
    first h-1 labels of a sequence are never dropped. labels: [T] or [B, T]."""
    if labels.device not in _GOLDFISH_TABLE:
        table = torch.rand(1_000_003, generator=torch.Generator().manual_seed(2971215073))
        _GOLDFISH_TABLE[labels.device] = table.to(labels.device)
    table = _GOLDFISH_TABLE[labels.device]
    squeeze = labels.dim() == 1
    labels = labels[None] if squeeze else labels
    drop = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    if labels.shape[1] >= h:
        keys = labels.long().unfold(1, h, 1).prod(dim=-1) % 1_000_003  # [B, T-h+1]
        drop[:, h - 1:] = table[keys] < 1 / k
    return drop[0] if squeeze else drop


def loss_mask(x, y, t: TrainConfig, eos_id):
    """Tokens that count: not where the INPUT is EOS (Megatron's eod-mask-loss), nor Goldfish-dropped."""
    mask = x != eos_id
    return mask & ~goldfish_mask(y, t.goldfish_k, t.goldfish_h) if t.goldfish else mask


# dense bf16 peak (no sparsity) per GPU, from NVIDIA's datasheets; looked up by the device name, the
# longest matching key first ("H100 PCIe" before "H100", "GH200" before "H200")
PEAK_BF16_FLOPS = {"H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H800": 989e12, "GH200": 989e12,
                   "H200": 989e12, "H200 NVL": 835e12, "A100": 312e12, "A800": 312e12, "B200": 2250e12,
                   "GB200": 2500e12, "L40S": 362e12}


def peak_flops(device):
    """Dense bf16 peak of the GPU, looked up by its name; None when unknown (MFU is then null)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


# ----------------------------------------------------------------------------- memory plan
def activation_bytes_per_token(m, tp, sp, wb, compiled):
    """What autograd keeps for backward, per token and block, on one rank: tp splits the heads and the
    MLP, sp (sequence parallelism) the norms' inputs; wb is the weights' bytes per element."""
    d, ff = m.hidden_size, m.intermediate_size / tp
    hq, hkv, H = m.num_attention_heads * m.head_dim / tp, m.num_key_value_heads * m.head_dim / tp, m.num_attention_heads / tp
    if compiled:  # measured on an H100 in bf16 (bench.py, activation_bytes_per_token_layer): the inputs of
        # the two norms and four matmul groups, q before and after norm + RoPE, k likewise, v, the
        # attention output, the MLP's up projection and activation, and the fp32 logsumexp
        return 4 * d / sp + 4 * d + 6 * hq + 8 * hkv + 4 * ff + 4 * H
    # eager, tensor by tensor (tests/test_train.py checks it against autograd's saved tensors): each norm
    # keeps its input in fp32 and its normalised output, each matmul group its input; q and k their fp32
    # copy, normalised and rotated values, v itself; the attention output (also o_proj's input, copied)
    # and the fp32 logsumexp; xIELU its input and intermediates (5 values and a mask per feature)
    return (2 * (4 + wb) * d / sp + 2 * wb * d + (4 + 4 * wb) * hq + (4 + 3 * wb) * hkv + 4 * H
            + (1 + 5 * wb) * ff)


def memory_plan(cfg, tp, dp, stage=0):
    """Per-GPU memory of one pipeline stage of a layout (stage 0: the first), from the config alone
    (nothing is allocated): a dict of named byte counts and the peak. Activations: see
    activation_bytes_per_token. Under 1F1B, stage s holds the activations of min(pp - s, m)
    micro-batches at once."""
    m, t, p = cfg["model"], cfg["train"], cfg["parallel"]
    pp = p.pp
    wb = 2 if t.dtype == "bfloat16" else 4
    moments = {"ademamix": 3 if t.beta1 != 0 else 2, "adamw": 2}[t.optimizer]
    B, T, d, L = t.micro_batch_size, cfg["data"].seq_len, m.hidden_size, m.num_hidden_layers
    N = B * T  # tokens of one micro-batch
    first, last = stage == 0, stage == pp - 1
    embed = m.vocab_size * d
    per_layer = (param_count(m) - 2 * embed - d) / L
    n = (per_layer * L / pp + embed * first + (embed + d) * last) / tp  # replicated norms: a rounding error
    sp = tp if p.sequence_parallel and tp > 1 else 1
    Vl = m.vocab_size / tp
    per_tok = activation_bytes_per_token(m, tp, sp, wb, t.compile)
    held = min(pp - stage, t.global_batch_size // (dp * B))  # micro-batches in flight on this stage
    if t.activation_checkpointing:  # block inputs, plus one block recomputed during backward
        activations = held * wb * d / sp * N * L / pp + per_tok * N
    else:
        activations = held * per_tok * N * L / pp
    chunk = model_py.LOSS_CHUNK_ELEMENTS
    chunk = chunk if isinstance(chunk, int) else chunk["cpu" if t.device == "cpu" else "cuda"]
    chunk = min(max(1, chunk // Vl), N) * Vl  # whole rows of logits, at most the micro-batch's (model.lm_head_loss)
    # fp32 head gradient and input gradient, and one chunk: its logits and gradient (and, eager, fp32 temporaries)
    loss = (4 * Vl * d + 4 * N * d + chunk * (2 * wb + (0 if t.compile else 12))) if last else 0
    rows = {
        "weights": n * wb,
        "gradient buffer (fp32)": n * 4,
        "gradient partition (fp32, dp > 1)": n * 4 / dp if dp > 1 else 0,
        "fp32 master + optimizer moments": n * 4 * (1 + moments) / dp,
        f"activations ({held} micro-batch{'es' if held > 1 else ''} in flight)": activations,
        "loss buffers (chunked head + cross-entropy)": loss,
        "head gradient handed to autograd": (4 + wb) * Vl * d if last else 0,  # at the start of backward
    }
    static = sum(v for k, v in rows.items() if k in ("weights", "gradient buffer (fp32)", "fp32 master + optimizer moments",
                                                        "gradient partition (fp32, dp > 1)"))
    # the update's fp32 temporaries (two per foreach batch of OPT_CHUNK elements) come after backward
    peak = static + max(activations + loss + rows["head gradient handed to autograd"], 2 * 4 * min(OPT_CHUNK, n / dp))
    return rows, peak


def plan(cfg, tp, dp):
    """The memory plan as text: every stage that can be the largest (the first holds the most
    activations, the last the head and the loss)."""
    m, t, p = cfg["model"], cfg["train"], cfg["parallel"]
    parallel.check_layout(m, tp * p.pp * dp, tp, dp, t.global_batch_size, t.micro_batch_size,
                          cfg["data"].seq_len, p.sequence_parallel, p.pp)
    lines = [f"layout tp={tp} pp={p.pp} dp={dp} ({tp * p.pp * dp} GPUs), micro_batch {t.micro_batch_size} x seq_len "
             f"{cfg['data'].seq_len}, {t.global_batch_size // (dp * t.micro_batch_size)} micro-batches per step, "
             f"{t.dtype} weights, {t.optimizer}, sequence_parallel={p.sequence_parallel}, compile={t.compile}"]
    for ckpt in (False, True):
        c = {**cfg, "train": type(t)(**{**asdict(t), "activation_checkpointing": ckpt})}
        lines.append(f" {'with' if ckpt else 'without'} activation checkpointing:")
        for stage in sorted({0, p.pp - 1}):
            rows, peak = memory_plan(c, tp, dp, stage)
            name = "" if p.pp == 1 else f" (stage {stage}, the {'first' if stage == 0 else 'last'})"
            lines += [f"  {k:<50}{v / 1e9:>9.1f} GB" for k, v in rows.items() if v]
            fits = ", ".join(f"{'fits' if peak < cap * 0.9 else 'does NOT fit'} {gpu}"
                             for gpu, cap in (("GH200 96 GB", 96e9), ("H100 80 GB", 80e9)))
            lines.append(f"  peak{name} {peak / 1e9:.1f} GB -> {fits}")
    lines.append("  (fits = under 90% of the GPU's memory, leaving room for the allocator's fragmentation)")
    return "\n".join(lines)


def peak_memory(cfg, tp, dp):
    """The largest stage's planned peak, in bytes."""
    return max(memory_plan(cfg, tp, dp, s)[1] for s in {0, cfg["parallel"].pp - 1})


# ----------------------------------------------------------------------------- the run
def build(cfg, grid, device):
    """The model, on the meta device first, cut to this pipeline stage, tensor-parallelised, then
    materialised and initialised from one seed (each full tensor drawn, this rank's slice kept):
    every layout starts equal."""
    t = cfg["train"]
    with torch.device("meta"):
        model = Apertus(cfg["model"])
    parallel.keep_stage(model, grid)
    parallel.parallelize(model, grid)
    model.to_empty(device=device)
    model.init_weights(t.seed, lambda role, full: parallel.tp_slice(full, role, grid))
    dtype = torch.bfloat16 if device.type == "cuda" and t.dtype == "bfloat16" else torch.float32
    model.to(dtype)
    model.attn_backend = "flex" if device.type == "cuda" else "sdpa"
    model.activation_checkpointing = t.activation_checkpointing
    if t.compile:
        model.compile_blocks()
    return model


def log(grid, *args):
    if grid.rank == 0:
        print(*args, flush=True)


def all_sum(x, *groups):
    """Sum x over the given process groups (None or a group of one: nothing to do)."""
    for g in groups:
        if g is not None:
            torch.distributed.all_reduce(x, group=g)
    return x


def micro_loss(model, x, y, mask, n_tokens, hidden=None):
    """One micro-batch on this rank's stage: its share of the global mean loss (the last stage), or the
    activations for the next stage."""
    cfg = model.config
    doc = document_ids(x, cfg.eos_token_id, cfg.bos_token_id)
    out = model(x, y, loss_mask=mask, doc_ids=doc, reduction="sum", hidden=hidden)
    return out / n_tokens if model.lm_head is not None else out


def forward_backward(model, opt, batches, t, grid, train=True):
    """One global batch on this rank: the micro-batches' losses summed and normalised by the number of
    tokens that count in the WHOLE global batch, so that the gradient does not depend on the layout or
    the micro-batch split. Returns the global mean loss (a float: one host sync per step), the seconds
    this pipeline stage spent waiting for its neighbours, and the seconds of this rank's own work
    (forward and backward, the waiting left out: a straggler shows there)."""
    cfg = model.config
    batches = [(b.x.to(grid.device, non_blocking=True), b.y.to(grid.device, non_blocking=True),
                None if b.loss_mask is None else b.loss_mask.to(grid.device, non_blocking=True)) for b in batches]
    masks = [loss_mask(x, y, t, cfg.eos_token_id) if train else x != cfg.eos_token_id for x, y, _ in batches]
    # a packed source (chat data) brings its own loss mask: only the assistant's tokens count
    masks = [m if packed is None else m & packed for m, (_, _, packed) in zip(masks, batches)]
    n_tokens = all_sum(sum(m.sum() for m in masks).float(), grid.dp_group)
    steps = [functools.partial(micro_loss, model, x, y, m, n_tokens) for (x, y, _), m in zip(batches, masks)]
    t0 = time.perf_counter()
    if grid.pp > 1:  # every stage reads the same batch; the first uses the tokens, the last the targets
        B, T = batches[0][0].shape
        sp = grid.tp if grid.sequence_parallel else 1
        dtype = next(model.parameters()).dtype
        pipe = parallel.Pipe(grid, (B, T // sp, cfg.hidden_size), dtype)
        total, _ = parallel.pipeline_1f1b(steps, pipe, opt, train)
        waited, groups = pipe.wait_s, (grid.dp_group, grid.pp_group)
    else:
        total, waited, groups = torch.zeros((), device=grid.device), 0.0, (grid.dp_group,)
        for i, step in enumerate(steps):
            opt.sync = i == len(steps) - 1  # only the last micro-step's backward reduces the buckets
            loss = step()
            if train:
                loss.backward()
            total += loss.detach()
    parallel.wait_for_stream(grid.device)
    busy = time.perf_counter() - t0 - waited
    return all_sum(total, *groups).item(), waited, busy


def train_step(model, opt, batches, lr, t, grid):
    """Forward and backward over the global batch, then the update. Returns (loss, grad_norm, seconds
    spent waiting in the pipeline, seconds of this rank's own work); a non-finite loss or gradient
    skips the update."""
    loss, waited, busy = forward_backward(model, opt, batches, t, grid)
    if not math.isfinite(loss):
        opt.skip_step()
        return loss, float("nan"), waited, busy
    return loss, opt.step(lr, t.grad_clip).item(), waited, busy


@torch.no_grad()
def evaluate(model, loader, n_batches, t, grid, opt):
    """{source name: mean loss over n_batches global batches of its held-out samples}."""
    model.eval()
    losses = {name: sum(forward_backward(model, opt, loader.val_batches(s, i), t, grid, train=False)[0]
                        for i in range(n_batches)) / n_batches for s, name in enumerate(loader.source_names)}
    model.train()
    return losses


def sample(model, tok, t, device):
    """A few tokens from the trained model (one process). Eager, with SDPA: every new length would be a
    new shape for the compiled blocks and the FlexAttention mask."""
    model.eval()
    backend, model.attn_backend = model.attn_backend, "sdpa"
    prompt = torch.tensor([[tok.bos_id] + tok.encode("def ")], device=device)
    torch.manual_seed(t.seed)
    try:
        with torch.compiler.set_stance("force_eager"):
            return tok.decode(model.generate(prompt, t.sample_tokens, temperature=0.8, top_k=50)[0].tolist())
    finally:
        model.attn_backend = backend


def setup(cfg):
    """Everything a run needs before its first step: the grid, data, model and optimizer."""
    t, dcfg, mcfg = cfg["train"], cfg["data"], cfg["model"]
    device_type = t.device if t.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    _, world, _ = parallel.env_rank()
    p = cfg["parallel"]
    parallel.check_layout(mcfg, world, p.tp, None, t.global_batch_size, t.micro_batch_size, dcfg.seq_len,
                          p.sequence_parallel, p.pp)
    grid = parallel.init_distributed(cfg["parallel"], device_type)
    torch.manual_seed(t.seed * 1_000_003 + grid.rank)  # each rank's own stream, the same in every run
    tok = data.get_tokenizer(dcfg.tokenizer)
    if tok.vocab_size > mcfg.vocab_size:
        raise ConfigError(f"tokenizer {dcfg.tokenizer} has {tok.vocab_size} ids, model.vocab_size is {mcfg.vocab_size}")
    # rank 0 first: a demo corpus ("demo:..." prefixes, or no dataset at all) is prepared once, by it
    if grid.rank != 0:
        torch.distributed.barrier()
    stages = data.stage_table(dcfg, t.global_batch_size)
    if grid.rank == 0 and grid.world > 1:
        torch.distributed.barrier()
    loader = data.DataLoader(stages, dcfg.seq_len, t.global_batch_size, t.micro_batch_size, grid.dp_rank, grid.dp,
                             t.seed, mcfg.vocab_size, dcfg.val_fraction, token_vocab=tok.vocab_size)
    model = build(cfg, grid, grid.device)
    opt = parallel.DistributedOptimizer(model, grid, make_optimizer(t), cfg["parallel"].bucket_size)
    return grid, tok, loader, model, opt


def resume(t, grid, opt, loader):
    """The newest good checkpoint in out_dir (verified; a bad one is skipped), else the Hugging Face
    weights of init_from, else nothing (the seeded init). Returns (step, the checkpoint's meta.json)."""
    path = checkpoint.find_resume(t.out_dir, grid)
    if path:
        step, meta, nbytes = checkpoint.load_checkpoint(path, opt, grid, t.optimizer)
        lo, hi, total = across_ranks(nbytes / 1e6, grid)
        log(grid, f"resumed from {path} at step {step} (read {lo:.1f} to {hi:.1f} MB per rank, {total:.1f} MB in all)")
        # the blend's position: without it (or from another [data] table) the loader recomputes it, slowly
        if meta.get("data_state") is not None and not loader.load_state(meta["data_state"]):
            log(grid, "the checkpoint's data position was made with another [data] table or batch size: recomputing it")
        return step, meta
    if t.init_from:
        nbytes = checkpoint.load_hf_into(opt, t.init_from, grid)
        lo, hi, total = across_ranks(nbytes / 1e6, grid)
        log(grid, f"initialised from {t.init_from} (read {lo:.1f} to {hi:.1f} MB per rank, {total:.1f} MB in all)")
        return 0, {"export_dtype": str(checkpoint.hf_dtype(t.init_from)).removeprefix("torch.")}
    return 0, {}


def across_ranks(x, grid):
    """(min, max, sum) of a float over all ranks."""
    mm = torch.tensor([-x, x], dtype=torch.float64, device=grid.device)
    sm = torch.tensor([x], dtype=torch.float64, device=grid.device)
    if grid.world > 1:
        torch.distributed.all_reduce(mm, op=torch.distributed.ReduceOp.MAX)
        torch.distributed.all_reduce(sm)
    return -mm[0].item(), mm[1].item(), sm.item()


SIGNALLED = {"name": None}  # the signal handler's only state: the loop reads it after each step


def on_signal(signum, frame):
    """SIGUSR1 (Slurm's warning before the time limit) or SIGTERM (torchrun stopping, or scancel):
    finish the step, save, exit."""
    SIGNALLED["name"] = signal.Signals(signum).name


def agree(grid, *flags):
    """Flags any rank raised, known to every rank (one small all-reduce): they must all stop together."""
    v = torch.tensor([float(f) for f in flags], device=grid.device)
    if grid.world > 1:
        torch.distributed.all_reduce(v, op=torch.distributed.ReduceOp.MAX)
    return [bool(x) for x in v.tolist()]


def watchdog(t):
    """(Re)arm the hang watchdog: if this rank does not come back here within hang_timeout_s, every
    thread's stack is printed and the process exits 1, so that srun or torchrun restarts the job."""
    if t.hang_timeout_s:
        faulthandler.dump_traceback_later(t.hang_timeout_s, exit=True)


class SaveError(checkpoint.CheckpointError):
    pass


def save(saver, t, step, opt, grid, meta, loader):
    """A checkpoint of `step` (its files in the background with async_checkpoint). Returns the seconds
    the loop was blocked."""
    blocked = saver.save(step, opt, dict(meta, data_state=loader.state(step)))
    if saver.error is None:  # a failure is said once, by the loop, when every rank knows of it
        log(grid, f"{'saving' if t.async_checkpoint else 'saved'} checkpoint at step {step} ({blocked:.2f} s blocked)")
    return blocked


def wait_for_save(grid, saver):
    """Wait for the save in flight; if it failed on any rank, why (every rank learns of it, so that they
    all stop together), else None."""
    saver.wait()
    if agree(grid, saver.error is not None)[0]:
        return saver.error or "a checkpoint save failed on another rank"
    return None


def export_hf(t, grid, saver, dtype):
    """<out_dir>/hf from the newest checkpoint, in the dtype the weights came in, with the tokenizer
    files of init_from (when it is still there). Nothing is exported when that checkpoint's save
    failed (the loop says so)."""
    if wait_for_save(grid, saver):
        return
    error, out = None, os.path.join(t.out_dir, "hf")
    if grid.rank == 0:
        try:
            latest = checkpoint.latest_checkpoint(t.out_dir)
            checkpoint.consolidate(latest, out, getattr(torch, dtype))
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                         "generation_config.json", "chat_template.jinja"):
                if t.init_from and os.path.exists(os.path.join(t.init_from, name)):
                    shutil.copy(os.path.join(t.init_from, name), out)
            log(grid, f"exported {latest} to {out} ({dtype})")
        except (OSError, checkpoint.CheckpointError) as e:
            error = f"export to {out} failed: {e}"
    if agree(grid, error is not None)[0]:
        raise SaveError(error or "the export failed on rank 0")


def run(cfg):
    t, dcfg, mcfg = cfg["train"], cfg["data"], cfg["model"]
    grid, tok, loader, model, opt = setup(cfg)
    config_dict = {s: asdict(c) for s, c in cfg.items()}
    log(grid, f"config:\n{json.dumps(config_dict, indent=2)}")
    os.makedirs(t.out_dir, exist_ok=True)
    if grid.rank == 0:
        with open(os.path.join(t.out_dir, "config.json"), "w") as f:
            json.dump(config_dict, f, indent=2)
    step, meta = resume(t, grid, opt, loader)
    # what every checkpoint records beside the weights; export_dtype: the dtype the weights came in
    meta = dict(config=config_dict, optimizer=t.optimizer, export_dtype=meta.get("export_dtype", t.dtype))
    n_params = param_count(mcfg)
    fpt, peak = flops_per_token(mcfg, dcfg.seq_len, n_params), peak_flops(grid.device)
    log(grid, f"{n_params:,} parameters, layout tp={grid.tp} pp={grid.pp} dp={grid.dp}, device {grid.device}, "
              f"{t.global_batch_size // (grid.dp * t.micro_batch_size)} micro-batches of {t.micro_batch_size} "
              f"per rank per step")
    decay_start = t.decay_start if t.decay_start >= 0 else t.max_steps - t.decay_steps
    tokens_per_step = t.global_batch_size * dcfg.seq_len
    saver = checkpoint.Saver(t.out_dir, grid, t.keep_checkpoints, t.async_checkpoint)
    SIGNALLED["name"], signalled = None, False
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    metrics = open(os.path.join(t.out_dir, "metrics.jsonl"), "a") if grid.rank == 0 else None
    bar = None
    if grid.rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=t.max_steps, initial=step, desc="train", dynamic_ncols=True)
    model.train()
    watchdog(t)  # from the first step on: a hang in step 1 is caught too
    try:
        while step < t.max_steps:
            # ---- one step: timed alone (evaluations and saves are not training time)
            t0 = time.perf_counter()
            lr = wsd_lr(step, t.lr, t.min_lr, t.warmup_steps, decay_start, t.decay_steps, t.decay_shape)
            loss, norm, waited, busy = train_step(model, opt, loader.get_batch(step), lr, t, grid)
            parallel.wait_for_stream(grid.device)
            dt = time.perf_counter() - t0
            step += 1
            watchdog(t)
            if not math.isfinite(loss) or not math.isfinite(norm):
                log(grid, f"step {step}: {'loss' if not math.isfinite(loss) else 'gradient norm'} is not finite, "
                          f"update skipped")
            record = dict(step=step, loss=loss, lr=lr, grad_norm=norm, tokens_per_sec=round(tokens_per_step / dt, 1),
                          mfu=round(fpt * tokens_per_step / dt / (peak * grid.world), 4) if peak else None)
            if grid.device.type == "cuda":
                record["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(grid.device) / 1e9, 2)
            if grid.pp > 1:  # the fraction of the step this stage sat waiting (rank 0: the first stage)
                record["bubble"] = round(waited / dt, 4)
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            logged = step % t.log_interval == 0 or step == t.max_steps
            if logged:  # the slowest and the fastest rank's own work in this step: stragglers show
                lo, hi, _ = across_ranks(busy, grid)
                record["step_time_max_s"], record["step_time_min_s"] = round(hi, 4), round(lo, 4)
            record.update({f"tokens/{name}": n for name, n in loader.tokens_seen(step).items()})
            # ---- signals and failed saves (every rank learns of them together), evaluation, checkpoint
            signalled, save_failed = agree(grid, SIGNALLED["name"] is not None, saver.error is not None)
            if save_failed:
                say = saver.error or "a checkpoint save failed on another rank"
                saver.error = None
                if t.on_save_error == "stop":
                    raise SaveError(f"{say}; stopping (train.on_save_error = stop), the previous checkpoints are intact")
                log(grid, f"{say}; the previous checkpoints are intact, retrying at the next interval")
            if not signalled and (step == t.max_steps or (t.eval_interval and step % t.eval_interval == 0)):
                losses = evaluate(model, loader, dcfg.eval_batches, t, grid, opt)
                # val_loss: the sources' losses weighted as the stage of the last step mixes them
                record["val_loss"] = sum(w * losses[n] for n, w in loader.stage_weights(step - 1).items())
                record.update({f"val_loss/{name}": v for name, v in losses.items()})
                log(grid, f"step {step}: val loss {record['val_loss']:.4f}")
                watchdog(t)
            export = t.export_hf and t.export_hf_every and step % t.export_hf_every == 0 and step != t.max_steps
            if (step == t.max_steps or (t.checkpoint_interval and step % t.checkpoint_interval == 0)
                    or signalled or export):
                if signalled:
                    log(grid, f"{SIGNALLED['name'] or 'a signal'} received: saving step {step}; until it is "
                              f"complete the newest checkpoint is the previous one")
                record["checkpoint_block_s"] = round(save(saver, t, step, opt, grid, meta, loader), 4)
                watchdog(t)
            if export:
                export_hf(t, grid, saver, meta["export_dtype"])
                watchdog(t)
            if metrics and (logged or "val_loss" in record or "checkpoint_block_s" in record):
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if signalled:
                break
        failed = wait_for_save(grid, saver)  # the watchdog still armed: a commit that never comes is a hang too
    finally:
        faulthandler.cancel_dump_traceback_later()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if bar:
            bar.close()
        if metrics:
            metrics.close()
    if failed:
        raise SaveError(f"{failed}; the previous checkpoints are intact")
    if signalled:  # the last line says which checkpoint there is; nothing else runs within the grace
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
    parallel.shutdown(grid, opt)
    return model


def main(argv):
    args = [a for a in argv if a != "--plan"]
    if not args or args[0].startswith("--"):
        print(__doc__)
        return 2
    try:
        cfg = load_config(args[0], args[1:])
        if "--plan" in argv:
            print(plan(cfg, cfg["parallel"].tp, cfg["parallel"].dp or 1))
            return 0
        run(cfg)
    except parallel.LaunchError as e:  # this rank's own environment: every rank says it
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ConfigError, parallel.LayoutError) as e:  # the same on every rank: said once
        if parallel.env_rank()[0] == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except SaveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (data.DataError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
