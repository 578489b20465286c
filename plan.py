"""The plan of a layout: what one GPU holds at its peak, from the config alone (nothing is allocated).

    python plan.py configs/apertus-70b.toml --parallel.tp=4 --parallel.pp=8 --parallel.dp=128
    python plan.py configs/apertus-8b-sft.toml               # the layout of the config's [parallel]

Every key of the config can be overridden as in train.py (--section.key=value); parallel.dp, which a run
takes from the world size, sets the data-parallel degree here. `plan_layout` returns the numbers (per
stage, with and without activation checkpointing); `format_plan` prints them. `python train.py CONFIG
--plan` is the same command.
"""
import sys
from dataclasses import replace

import checkpoint
import model as model_py
import parallel
import train
from model import param_count

GPUS = (("GH200 96 GB", 96e9), ("H100 80 GB", 80e9))  # "fits": under 90% of the GPU's memory
FIT = 0.9  # leaving room for the allocator's fragmentation


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


def memory_plan(cfg, tp, dp, stage=0):
    """Per-GPU memory of one pipeline stage of a layout (stage 0: the first): a dict of named byte counts
    and the peak. Activations: see activation_bytes_per_token, for the T/cp tokens of a sequence that a
    rank computes under context parallelism. Under 1F1B, stage s holds the activations of min(pp - s, m)
    micro-batches at once."""
    m, t, p = cfg["model"], cfg["train"], cfg["parallel"]
    pp = p.pp
    wb = 2 if t.dtype == "bfloat16" else 4
    moments = {"ademamix": 3 if t.beta1 != 0 else 2, "adamw": 2}[t.optimizer]
    B, T, d, L = t.micro_batch_size, cfg["data"].seq_len, m.hidden_size, m.num_hidden_layers
    N = B * T / p.cp  # tokens of one micro-batch on this rank
    zero = dp * p.cp  # ZeRO-1 partitions the optimizer over the dp x cp replicas of the weights
    first, last = stage == 0, stage == pp - 1
    embed = m.vocab_size * d
    per_layer = (param_count(m) - 2 * embed - d) / L
    n = (per_layer * L / pp + embed * first + (embed + d) * last) / tp  # replicated norms: a rounding error
    sp = tp if p.sequence_parallel and tp > 1 else 1
    Vl = m.vocab_size / tp
    per_tok = activation_bytes_per_token(m, tp, sp, wb, t.compile, p.cp)
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
        "gradient partition (fp32, dp > 1)": n * 4 / zero if zero > 1 else 0,
        "fp32 master + optimizer moments": n * 4 * (1 + moments) / zero,
        f"activations ({held} micro-batch{'es' if held > 1 else ''} in flight)": activations,
        "loss buffers (chunked head + cross-entropy)": loss,
        "head gradient handed to autograd": (4 + wb) * Vl * d if last else 0,  # at the start of backward
    }
    static = sum(v for k, v in rows.items() if k in ("weights", "gradient buffer (fp32)", "fp32 master + optimizer moments",
                                                        "gradient partition (fp32, dp > 1)"))
    # the update's fp32 temporaries (two per foreach batch of OPT_CHUNK elements) come after backward
    peak = static + max(activations + loss + rows["head gradient handed to autograd"], 2 * 4 * min(train.OPT_CHUNK, n / zero))
    return rows, peak


def plan_layout(cfg, tp=None, dp=None):
    """The numbers of a layout (tp and dp default to the config's [parallel]): {"tp", "cp", "pp", "dp", "gpus",
    "micro_batches", "stages": {(activation checkpointing, stage): (rows, peak bytes)}} for every stage
    that can be the largest (the first holds the most activations, the last the head and the loss)."""
    m, t, p = cfg["model"], cfg["train"], cfg["parallel"]
    tp, dp = tp or p.tp, dp or p.dp or 1
    parallel.check_layout(m, tp * p.cp * p.pp * dp, tp, dp, t.global_batch_size, t.micro_batch_size,
                          cfg["data"].seq_len, p.sequence_parallel, p.pp, p.cp)
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
    lines = [f"layout tp={plan['tp']}{cp} pp={plan['pp']} dp={plan['dp']} ({plan['gpus']} GPUs), micro_batch "
             f"{t.micro_batch_size} x seq_len {cfg['data'].seq_len}, {plan['micro_batches']} micro-batches per step, "
             f"{t.dtype} weights, {t.optimizer}, sequence_parallel={p.sequence_parallel}, compile={t.compile}"]
    for (ckpt, stage), (rows, peak) in plan["stages"].items():
        if stage == 0:
            lines.append(f" {'with' if ckpt else 'without'} activation checkpointing:")
        name = "" if plan["pp"] == 1 else f" (stage {stage}, the {'first' if stage == 0 else 'last'})"
        lines += [f"  {k:<50}{v / 1e9:>9.1f} GB" for k, v in rows.items() if v]
        fits = ", ".join(f"{'fits' if peak < cap * FIT else 'does NOT fit'} {gpu}" for gpu, cap in GPUS)
        lines.append(f"  peak{name} {peak / 1e9:.1f} GB -> {fits}")
    lines.append("  (fits = under 90% of the GPU's memory, leaving room for the allocator's fragmentation)")
    return "\n".join(lines)


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


def main(argv):
    args = [a for a in argv if a != "--plan"]
    if not args or args[0].startswith("--"):
        print(__doc__)
        return 2
    try:
        cfg = load(args[0], args[1:])
        print(format_plan(cfg, plan_layout(cfg)))
    except (train.ConfigError, parallel.LayoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
