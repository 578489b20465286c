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
    python train.py configs/apertus-70b.toml --plan --parallel.tp=4 --parallel.dp=128

Every key of the config can be overridden as --section.key=value. A run directory that holds a
checkpoint is resumed from its newest complete one, under any (tp, dp) layout.
"""
import json
import math
import os
import signal
import sys
import time
import tomllib
import typing
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import torch

import checkpoint
import data
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
    keep_checkpoints: int = 3           # older checkpoints are deleted
    device: str = "auto"                # auto, cpu or cuda
    dtype: str = "bfloat16"             # weights and compute on CUDA: bfloat16 or float32 (CPU: float32)
    compile: bool = False               # torch.compile each transformer block
    activation_checkpointing: bool = False  # recompute each block in backward
    seed: int = 0                       # initial weights and the data order
    optimizer: str = "ademamix"         # ademamix or adamw
    lr: float = 1.1e-4                  # peak learning rate
    min_lr: float = 1.1e-5              # the learning rate at the end of the cooldown
    warmup_steps: int = 100             # linear warmup from 0
    decay_start: int = -1               # first step of the cooldown (-1: max_steps - decay_steps)
    decay_steps: int = 0                # length of the cooldown (0: no cooldown)
    decay_shape: str = "1-sqrt"         # 1-sqrt or linear
    beta1: float = 0.9
    beta2: float = 0.999
    beta3: float = 0.9999               # AdEMAMix slow EMA
    alpha: float = 8.0                  # AdEMAMix weight of the slow EMA
    ademamix_warmup: int = 100_000      # steps over which alpha and beta3 warm up
    eps: float = 1e-8
    weight_decay: float = 0.1           # not on norms, 1-D parameters or xIELU scalars
    grad_clip: float = 0.1              # global gradient norm (0 = off)
    goldfish: bool = True               # Goldfish loss (drops about 1/k of the tokens from the loss)
    goldfish_k: int = 50
    goldfish_h: int = 50
    sample_tokens: int = 200            # tokens sampled at the end (0 = none)


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
    for key, allowed in (("device", ("auto", "cpu", "cuda")), ("dtype", ("bfloat16", "float32")),
                         ("optimizer", ("ademamix", "adamw")), ("decay_shape", ("1-sqrt", "linear"))):
        if getattr(t, key) not in allowed:
            raise ConfigError(f"train.{key} must be one of {', '.join(allowed)}, got {getattr(t, key)!r}")
    return out


# ----------------------------------------------------------------------------- the recipe
class AdEMAMix(torch.optim.Optimizer):
    """AdEMAMix (Pagliardini et al. 2024, arXiv 2409.03137), as apple/ml-ademamix:
        m1 = b1 m1 + (1-b1) g;  m2 = b3(t) m2 + (1-b3(t)) g;  v = b2 v + (1-b2) g^2
        p -= lr * ((m1 / (1-b1^t) + alpha(t) m2) / (sqrt(v) / sqrt(1-b2^t) + eps) + wd p)
    The slow EMA m2 is not bias-corrected. alpha warms up linearly over alpha_warmup steps, beta3
    linearly in half-life from beta1 over beta3_warmup steps. The first update is step 1."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=8.0, alpha_warmup=None,
                 beta3_warmup=None, eps=1e-8, weight_decay=0.1):
        super().__init__(params, dict(lr=lr, betas=betas, alpha=alpha, alpha_warmup=alpha_warmup,
                                      beta3_warmup=beta3_warmup, eps=eps, weight_decay=weight_decay))

    @staticmethod
    def schedules(t, group):
        b1, _, b3 = group["betas"]
        alpha, Ta, Tb = group["alpha"], group["alpha_warmup"], group["beta3_warmup"]
        if Ta:
            alpha = min(t * alpha / Ta, alpha)
        if Tb:
            f = t / Tb
            b3 = min(math.exp(math.log(b1) * math.log(b3) / ((1 - f) * math.log(b3) + f * math.log(b1))), b3)
        return alpha, b3

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2, _ = group["betas"]
            by_step = {}  # parameters that share a step count are updated in one foreach batch
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"], st["exp_avg_slow"], st["exp_avg_sq"] = (torch.zeros_like(p) for _ in range(3))
                st["step"] += 1
                by_step.setdefault(int(st["step"]), []).append(p)
            for t, ps in by_step.items():
                alpha, b3 = self.schedules(t, group)
                g = [p.grad for p in ps]
                m1, m2, v = ([self.state[p][k] for p in ps] for k in ("exp_avg", "exp_avg_slow", "exp_avg_sq"))
                torch._foreach_lerp_(m1, g, 1 - b1)
                torch._foreach_lerp_(m2, g, 1 - b3)
                torch._foreach_mul_(v, b2)
                torch._foreach_addcmul_(v, g, g, value=1 - b2)
                denom = torch._foreach_sqrt(v)
                torch._foreach_div_(denom, math.sqrt(1 - b2 ** t))
                torch._foreach_add_(denom, group["eps"])
                upd = torch._foreach_div(m1, 1 - b1 ** t)
                torch._foreach_add_(upd, m2, alpha=alpha)
                torch._foreach_div_(upd, denom)
                if group["weight_decay"]:
                    torch._foreach_add_(upd, ps, alpha=group["weight_decay"])
                torch._foreach_add_(ps, upd, alpha=-group["lr"])


def make_optimizer(t: TrainConfig, model):
    """Param groups: weight decay only on matrices (not on norms, 1-D parameters or xIELU scalars).
    Takes (name, tensor) pairs: under ZeRO-1 the tensors are this rank's flat master pieces."""
    dims = {n: p.dim() for n, p in model.named_parameters()}

    def build(named_tensors):
        decay = [m for n, m in named_tensors if dims[n] >= 2 and "act_fn" not in n]
        no_decay = [m for n, m in named_tensors if not (dims[n] >= 2 and "act_fn" not in n)]
        groups = [dict(params=decay, weight_decay=t.weight_decay), dict(params=no_decay, weight_decay=0.0)]
        if t.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, foreach=True)
        return AdEMAMix(groups, lr=t.lr, betas=(t.beta1, t.beta2, t.beta3), alpha=t.alpha,
                        alpha_warmup=t.ademamix_warmup, beta3_warmup=t.ademamix_warmup, eps=t.eps)
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


_GOLDFISH_TABLE = {}


def goldfish_mask(labels, k=50, h=50):
    """Goldfish loss (Hans et al. 2024), exactly as the Apertus data pipeline: True where the label is
    dropped from the loss. Each window of h labels is hashed (their int64 product, which wraps around,
    modulo 1,000,003) into a fixed random table; the window's decision applies to its last label; the
    first h-1 labels of a sequence are never dropped. labels: [T] or [B, T]."""
    if "table" not in _GOLDFISH_TABLE:
        _GOLDFISH_TABLE["table"] = torch.rand(1_000_003, generator=torch.Generator().manual_seed(2971215073))
    table = _GOLDFISH_TABLE["table"].to(labels.device)
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


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "H800": 989e12, "A100": 312e12,
                   "A800": 312e12, "B200": 2250e12, "GB200": 2500e12, "L40S": 362e12}


def peak_flops(device):
    """Dense bf16 peak of the GPU, looked up by its name; None when unknown (MFU is then null)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # GH200 before H200
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


# ----------------------------------------------------------------------------- memory plan
def plan(cfg, tp, dp):
    """Per-GPU memory of a layout, from the config alone (nothing is allocated)."""
    m, t, p = cfg["model"], cfg["train"], cfg["parallel"]
    parallel.check_layout(m, tp * dp, tp, dp, t.global_batch_size, t.micro_batch_size,
                          cfg["data"].seq_len, p.sequence_parallel)
    n = param_count(m) / tp  # replicated norms are a rounding error here
    wbytes = 2 if t.dtype == "bfloat16" else 4
    states = 3 if t.optimizer == "ademamix" else 2
    B, T, d, L = t.micro_batch_size, cfg["data"].seq_len, m.hidden_size, m.num_hidden_layers
    ff, hq, hkv, D, V = m.intermediate_size, m.num_attention_heads, m.num_key_value_heads, m.head_dim, m.vocab_size
    sp = tp if p.sequence_parallel else 1
    # saved activations of one block, bytes per token: inputs of the norms and residual (sequence-sharded
    # with SP), q/k/v/attention out, MLP up and xIELU out (sharded over TP); flash-style attention
    per_tok = wbytes * (4 * d / sp + (2 * hq * D + 2 * hkv * D) / tp + 2 * ff / tp) + 4 * hq / tp
    rows = {
        "weights": n * wbytes,
        "gradients (fp32 accumulation buffer)": n * 4,
        "fp32 master + optimizer shard": n * 4 * (1 + states) / dp,
        "activations, no checkpointing": per_tok * B * T * L + B * T * V / tp * 4 * 2,
        "activations, checkpointing": (wbytes * d / sp) * B * T * L + per_tok * B * T + B * T * V / tp * 4 * 2,
    }
    lines = [f"layout tp={tp} dp={dp} ({tp * dp} GPUs), micro_batch {B} x seq_len {T}, "
             f"{t.dtype} weights, {t.optimizer}, sequence_parallel={p.sequence_parallel}"]
    lines += [f"  {k:<40}{v / 1e9:>9.1f} GB" for k, v in rows.items()]
    base = rows["weights"] + rows["gradients (fp32 accumulation buffer)"] + rows["fp32 master + optimizer shard"]
    for label, act in (("without", rows["activations, no checkpointing"]),
                       ("with", rows["activations, checkpointing"])):
        total = base + act
        fits = ", ".join(f"{'fits' if total < cap * 0.9 else 'does NOT fit'} {gpu}"
                         for gpu, cap in (("GH200 96 GB", 96e9), ("H100 80 GB", 80e9)))
        lines.append(f"  total {label} activation checkpointing: {total / 1e9:.1f} GB -> {fits}")
    lines.append("  (fits = under 90% of the GPU's memory, leaving room for buffers and fragmentation)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the run
def build(cfg, grid, device):
    """The model, on the meta device first, tensor-parallelised, then materialised and initialised
    from one seed (each full tensor drawn, this rank's slice kept): every layout starts equal."""
    t = cfg["train"]
    with torch.device("meta"):
        model = Apertus(cfg["model"])
    parallel.parallelize(model, grid)
    model.to_empty(device=device)
    model.init_weights(t.seed, lambda name, full: parallel.shard_of(full, parallel.tp_dim(model, name), grid))
    dtype = torch.bfloat16 if device.type == "cuda" and t.dtype == "bfloat16" else torch.float32
    model.to(dtype)
    model.attn_backend = "flex" if device.type == "cuda" else "sdpa"
    model.activation_checkpointing = t.activation_checkpointing
    if t.compile:  # per block: the blocks repeat, so compilation stays short
        for i, block in enumerate(model.model.layers):
            model.model.layers[i] = torch.compile(block)
    return model


def log(grid, *args):
    if grid.rank == 0:
        print(*args, flush=True)


def run(cfg, overrides_text=""):
    t, dcfg, mcfg = cfg["train"], cfg["data"], cfg["model"]
    device_type = t.device if t.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, _ = parallel.env_rank()
    parallel.check_layout(mcfg, world, cfg["parallel"].tp, None, t.global_batch_size, t.micro_batch_size,
                          dcfg.seq_len, cfg["parallel"].sequence_parallel)
    grid = parallel.init_distributed(cfg["parallel"], device_type)
    device = grid.device
    tok = data.get_tokenizer(dcfg.tokenizer)
    if tok.vocab_size > mcfg.vocab_size:
        raise ConfigError(f"tokenizer {dcfg.tokenizer} has {tok.vocab_size} ids, model.vocab_size is {mcfg.vocab_size}")
    path = dcfg.dataset
    if not path:  # the offline demo corpus, prepared once by rank 0
        path = data.demo_dataset(dcfg.tokenizer) if grid.rank == 0 else None
        if grid.world > 1:
            box = [path]
            torch.distributed.broadcast_object_list(box, src=0)
            path = box[0]
    loaders = {split: data.DataLoader(path, split, dcfg.seq_len, t.global_batch_size, t.micro_batch_size,
                                      grid.dp_rank, grid.dp, t.seed, mcfg.vocab_size, shuffle=split == "train")
               for split in ("train", "val")}
    os.makedirs(t.out_dir, exist_ok=True)
    config_dict = {s: asdict(c) for s, c in cfg.items()}
    log(grid, f"config:\n{json.dumps(config_dict, indent=2)}")
    if grid.rank == 0:
        with open(os.path.join(t.out_dir, "config.json"), "w") as f:
            json.dump(config_dict, f, indent=2)

    model = build(cfg, grid, device)
    opt = parallel.DistributedOptimizer(model, grid, make_optimizer(t, model), cfg["parallel"].bucket_size)
    step = 0
    latest = checkpoint.latest_checkpoint(t.out_dir)
    if latest:
        step = checkpoint.load_checkpoint(latest, opt, grid, t.optimizer)
        log(grid, f"resumed from {latest} at step {step}")
    n_params = param_count(mcfg)
    fpt, peak = flops_per_token(mcfg, dcfg.seq_len, n_params), peak_flops(device)
    log(grid, f"{n_params:,} parameters, layout tp={grid.tp} dp={grid.dp}, device {device}, "
              f"{len(loaders['train'].get_batch(0))} micro-batches of {t.micro_batch_size} per rank per step")
    decay_start = t.decay_start if t.decay_start >= 0 else t.max_steps - t.decay_steps

    stop = {"signal": None}  # SIGUSR1 from Slurm before the time limit (or SIGTERM): save and exit
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda s, _: stop.update(signal=s))

    def global_sum(x):
        if grid.dp > 1:
            torch.distributed.all_reduce(x, group=grid.dp_group)
        return x

    def forward_loss(batches, train):
        batches = [(x.to(device), y.to(device)) for x, y in batches]
        masks = [loss_mask(x, y, t, mcfg.eos_token_id) if train else x != mcfg.eos_token_id for x, y in batches]
        n_tokens = global_sum(sum(m.sum() for m in masks).float())  # the global batch's counted tokens
        total = torch.zeros((), device=device)
        for i, ((x, y), m) in enumerate(zip(batches, masks)):
            opt.sync = i == len(batches) - 1  # set BEFORE the forward: only the last micro-step reduces
            loss = model(x, y, loss_mask=m, doc_ids=document_ids(x, mcfg.eos_token_id), reduction="sum")
            loss = loss / n_tokens
            if train:
                loss.backward()
            total += loss.detach()
        return global_sum(total).item()

    def evaluate():
        model.eval()
        with torch.no_grad():
            losses = [forward_loss(loaders["val"].get_batch(i), False) for i in range(dcfg.eval_batches)]
        model.train()
        return sum(losses) / len(losses)

    def save():
        checkpoint.save_checkpoint(t.out_dir, step, opt, grid, config_dict, t.optimizer, t.keep_checkpoints)
        log(grid, f"saved checkpoint at step {step}")

    metrics = open(os.path.join(t.out_dir, "metrics.jsonl"), "a") if grid.rank == 0 else None
    tokens_per_step = t.global_batch_size * dcfg.seq_len
    bar = None
    if grid.rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=t.max_steps, initial=step, desc="train", dynamic_ncols=True)
    model.train()
    t0 = time.perf_counter()
    while step < t.max_steps:
        lr = wsd_lr(step, t.lr, t.min_lr, t.warmup_steps, decay_start, t.decay_steps, t.decay_shape)
        loss = forward_loss(loaders["train"].get_batch(step), True)
        if not math.isfinite(loss):
            opt.finish_grads()  # drop this step's gradients
            log(grid, f"step {step + 1}: loss is {loss}, update skipped")
            norm = float("nan")
        else:
            norm = opt.step(lr, t.grad_clip).item()
            if not math.isfinite(norm):
                log(grid, f"step {step + 1}: gradient norm is {norm}, update skipped")
        step += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt, t0 = time.perf_counter() - t0, time.perf_counter()
        tps = tokens_per_step / dt
        record = dict(step=step, loss=loss, lr=lr, grad_norm=norm, tokens_per_sec=round(tps, 1),
                      mfu=round(fpt * tps / (peak * grid.world), 4) if peak else None)
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if step == t.max_steps or (t.eval_interval and step % t.eval_interval == 0):
            record["val_loss"] = evaluate()
            log(grid, f"step {step}: val loss {record['val_loss']:.4f}")
        if metrics and (step % t.log_interval == 0 or step == t.max_steps or "val_loss" in record):
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        signalled = stop["signal"] is not None
        if grid.world > 1:  # every rank must agree to stop, or the save would hang
            flag = torch.tensor([float(signalled)], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            signalled = bool(flag.item())
        if step == t.max_steps or (t.checkpoint_interval and step % t.checkpoint_interval == 0) or signalled:
            save()
            t0 = time.perf_counter()  # the save is not training time
        if signalled:
            log(grid, f"signal received: saved at step {step}, exiting (resume with the same command)")
            break
    if bar:
        bar.close()
    if t.sample_tokens and grid.rank == 0 and grid.world == 1 and step == t.max_steps:
        model.eval()
        prompt = torch.tensor([[tok.bos_id] + tok.encode("def ")], device=device)
        torch.manual_seed(t.seed)
        out = model.generate(prompt, t.sample_tokens, temperature=0.8, top_k=50)
        print("sample:\n" + tok.decode(out[0].tolist()))
    if grid.world > 1:
        torch.distributed.destroy_process_group()
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
    except (ConfigError, parallel.LayoutError, data.DataError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
