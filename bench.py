"""Training throughput of a config: tokens/s, TFLOP/s, MFU and peak memory of real optimizer steps.

    python bench.py configs/apertus-1b.toml                       # one GPU, the config as written
    python bench.py configs/apertus-8b.toml --model.num_hidden_layers=4 --steps 10
    python bench.py configs/apertus-70b.toml --per-rank-tp 4 --model.num_hidden_layers=4
    python bench.py configs/apertus-1b.toml --compare-hf          # the same shapes in transformers
    python bench.py configs/apertus-1b.toml --profile prof/       # a trace and the top kernels
    python bench.py configs/tiny.toml --steps 2 --warmup 1        # CPU works too (mfu is null)

The model and optimizer are built by train.setup's own pieces (train.build, DistributedOptimizer,
make_optimizer) and each step is train.train_step, so what is timed is what trains. Tokens are
synthetic, with documents (BOS ... EOS) of random length around --doc-len, so the FlexAttention
document mask has real boundaries. Warmup steps (compilation, autotuning, allocator growth) are run
and thrown away before the timed ones ("so we aren't cheating"). The last line printed is one JSON
object; MFU counts 6N (N without the input embedding) plus causal attention 6LHDT, against the GPU's
dense bf16 peak (train.PEAK_BF16_FLOPS). On such a GPU it also holds "plan_row", the measurement as a row
of plan.py's compute-efficiency table:

    python bench.py configs/apertus-70b.toml --per-rank-tp 4 --model.num_hidden_layers=4 | tee -a my-gpu.jsonl
    python plan.py configs/apertus-70b.toml --machine gh200-alps --gpus 4096 --efficiency my-gpu.jsonl
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

import data
import model as model_py
import parallel
import plan
import train
from model import flops_per_token, param_count

def synthetic_batches(cfg, grid, steps, doc_len, seed=0):
    """steps x this rank's micro-batches of random tokens cut into documents <s> ... </s>."""
    m, t, T = cfg["model"], cfg["train"], cfg["data"].seq_len
    per_rank = t.global_batch_size // grid.dp
    g = torch.Generator().manual_seed(seed + grid.dp_rank)
    out = []
    for _ in range(steps):
        rows = torch.randint(4, m.vocab_size, (per_rank, T + 1), generator=g)
        for row in rows:
            pos = 0
            while pos < T + 1:
                row[pos] = m.bos_token_id
                pos += max(2, int(torch.empty(1).exponential_(1 / doc_len, generator=g)))
                if pos - 1 < T + 1:
                    row[pos - 1] = m.eos_token_id
        mb = t.micro_batch_size
        out.append([data.Batch(rows[k:k + mb, :-1].contiguous(), rows[k:k + mb, 1:].contiguous(), None,
                               torch.zeros(mb, dtype=torch.int64)) for k in range(0, per_rank, mb)])
    return out

def per_rank_tp(cfg, tp):
    """The shapes one rank of a tp-way tensor-parallel run computes, as a model of its own (heads, KV
    heads, MLP width and vocabulary divided by tp; the residual width stays): a one-GPU stand-in."""
    m = cfg["model"]
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size"):
        if getattr(m, key) % tp:
            sys.exit(f"error: --per-rank-tp {tp} does not divide model.{key} ({getattr(m, key)})")
        setattr(m, key, getattr(m, key) // tp)
    cfg["parallel"].tp, cfg["parallel"].sequence_parallel = 1, False  # one process plays one rank

def plan_row(cfg, args, overrides, device, mfu, tp=1):
    """This measurement as a row of plan.EFFICIENCY: the shape one rank computes (hidden size, query and
    MLP widths, tokens per micro-batch; --per-rank-tp has already divided them) and its MFU. Give plan.py
    the file of bench.py's JSON lines with --efficiency FILE, or paste the row into plan.EFFICIENCY."""
    m, t = cfg["model"], cfg["train"]
    command = " ".join(["python bench.py", args.config, *overrides])
    return dict(name=f"{os.path.basename(args.config)} {' '.join(overrides)}".strip(), hidden=m.hidden_size,
                q_width=m.num_attention_heads * m.head_dim // tp, mlp_width=m.intermediate_size // tp,
                tokens=t.micro_batch_size * cfg["data"].seq_len, compile=t.compile, mfu=mfu,
                source=f"bench.py on {device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}: {command}")

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)

def activation_probe(model, device):
    """Forward hooks that record the memory allocated after each block: the differences are what one
    block keeps for backward."""
    marks = []
    if device.type != "cuda":
        return marks, []
    hooks = [b.register_forward_hook(lambda *_: marks.append(torch.cuda.memory_allocated(device)))
             for b in model.model.layers.values()]
    return marks, hooks

def bench_ours(cfg, grid, args):
    t = cfg["train"]
    model = train.build(cfg, grid, grid.device)
    opt = parallel.DistributedOptimizer(model, grid, train.make_optimizer(t), cfg["parallel"].bucket_size)
    batches = synthetic_batches(cfg, grid, args.warmup + args.steps, args.doc_len)
    model.train()
    times, marks = [], []
    from tqdm import tqdm
    bar = tqdm(total=args.warmup + args.steps, desc="bench", disable=grid.rank != 0, dynamic_ncols=True)
    for i, step_batches in enumerate(batches):
        if i == args.warmup:  # the timed steps start here, from a clean slate
            sync(grid.device)
            if grid.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(grid.device)
            marks, hooks = activation_probe(model, grid.device)
        t0 = time.perf_counter()
        loss, norm, *_ = train.train_step(model, opt, step_batches, t.lr, t, grid)
        parallel.wait_for_stream(grid.device)  # as train.py: the parameter all-gathers overlap the next step
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        if i == args.warmup:
            for h in hooks:
                h.remove()
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", step_s=f"{times[-1] if times else 0:.3f}")
    bar.close()
    per_layer = None
    first = marks[:len(model.model.layers)]  # the first micro-batch's forward of the first timed step
    if len(first) > 1:  # the steady growth from one block to the next: what a block keeps
        per_layer = statistics.median(b - a for a, b in zip(first[:-1], first[1:]))
    peak = torch.cuda.max_memory_allocated(grid.device) / 1e9 if grid.device.type == "cuda" else None
    if args.profile:
        profile(model, opt, batches[-1], cfg, grid, args.profile)
    saves = bench_checkpoint(opt, grid, args.checkpoint) if args.checkpoint else {}
    opt.wait_params()  # the last step's parameter all-gathers, before the process group goes
    return times, peak, per_layer, loss, saves

def bench_checkpoint(opt, grid, out_dir):
    """A synchronous save (the loop waits for all of it) against an asynchronous one (the loop waits
    for the copy to host memory only), same files, same directory, timed."""
    import checkpoint
    out = {}
    for mode in ("sync", "async"):
        saver = checkpoint.Saver(os.path.join(out_dir, mode), grid, keep=1, async_save=mode == "async")
        t0 = time.perf_counter()
        blocked = saver.save(1, opt, {"config": {}, "optimizer": "bench"})
        saver.wait()
        out[f"checkpoint_{mode}_block_s"] = round(blocked, 3)
        out[f"checkpoint_{mode}_total_s"] = round(time.perf_counter() - t0, 3)
        if saver.error:
            sys.exit(f"error: {saver.error}")
    out["checkpoint_bytes_per_rank"] = os.path.getsize(os.path.join(out_dir, "sync", "ckpt-00000001",
                                                                    f"rank-{grid.rank:05d}.safetensors"))
    return out

def profile(model, opt, step_batches, cfg, grid, out_dir):
    import os
    from torch.profiler import ProfilerActivity
    os.makedirs(out_dir, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if grid.device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(2):
            train.train_step(model, opt, step_batches, cfg["train"].lr, cfg["train"], grid)
            parallel.wait_for_stream(grid.device)
    path = os.path.join(out_dir, f"trace-rank{grid.rank}.json")
    prof.export_chrome_trace(path)
    key = "self_cuda_time_total" if grid.device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25), file=sys.stderr)
    print(f"trace written to {path}", file=sys.stderr)

def bench_hf(cfg, args, device):
    """transformers' ApertusForCausalLM on the same shapes: bf16 weights, torch.compile, SDPA (its best
    attention here; with no document mask: it attends causally across documents, which is less masking
    and no less work than ours), fused AdamW, the same global batch by gradient accumulation."""
    import transformers
    m, t = cfg["model"], cfg["train"]
    rope = {"rope_type": "default", "rope_theta": m.rope_theta} if m.rope_scaling is None else \
        {**m.rope_scaling, "rope_theta": m.rope_theta}
    hcfg = transformers.ApertusConfig(
        hidden_size=m.hidden_size, intermediate_size=m.intermediate_size, num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_key_value_heads, head_dim=m.head_dim,
        vocab_size=m.vocab_size, max_position_embeddings=m.max_position_embeddings, rope_parameters=rope)
    hcfg._attn_implementation = "sdpa"
    with torch.device(device):
        hf = transformers.AutoModelForCausalLM.from_config(hcfg, dtype=torch.bfloat16)
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, fused=device.type == "cuda")
    fwd = torch.compile(hf) if device.type == "cuda" else hf
    batches = synthetic_batches(cfg, parallel.Grid(), args.warmup + args.steps, args.doc_len, seed=1)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i, step_batches in enumerate(batches):
        t0 = time.perf_counter()
        for b in step_batches:
            out = fwd(input_ids=b.x.to(device), labels=b.y.to(device), shift_labels=b.y.to(device))
            (out.loss / len(step_batches)).backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), t.grad_clip or 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return times, peak

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, autotuning)")
    p.add_argument("--doc-len", type=int, default=2048, help="mean document length of the synthetic tokens")
    p.add_argument("--per-rank-tp", type=int, default=1, help="bench one rank's shapes of this TP degree")
    p.add_argument("--compare-hf", action="store_true", help="also time transformers on the same shapes")
    p.add_argument("--profile", metavar="DIR", help="write a torch.profiler trace, print the top kernels")
    p.add_argument("--flex-options", metavar="JSON", help="FlexAttention kernel_options, e.g. '{\"BLOCK_M\": 128}'")
    p.add_argument("--loss-chunk", type=int, help="logits elements per chunk of the loss (model.LOSS_CHUNK_ELEMENTS)")
    p.add_argument("--checkpoint", metavar="DIR", help="also time a synchronous and an asynchronous save into DIR")
    args, overrides = p.parse_known_args(argv)
    try:
        cfg = train.load_config(args.config, overrides)
    except train.ConfigError as e:
        sys.exit(f"error: {e}")
    if args.per_rank_tp > 1:
        per_rank_tp(cfg, args.per_rank_tp)
    if args.flex_options:
        model_py.FLEX_KERNEL_OPTIONS = json.loads(args.flex_options)
    if args.loss_chunk:
        model_py.LOSS_CHUNK_ELEMENTS = args.loss_chunk
    t, m, T = cfg["train"], cfg["model"], cfg["data"].seq_len
    device_type = t.device if t.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        train.check_layout(cfg, parallel.env_rank()[1])
    except parallel.LayoutError as e:
        sys.exit(f"error: {e}")
    grid = parallel.init_distributed(cfg["parallel"], device_type)
    times, peak, per_layer, loss, saves = bench_ours(cfg, grid, args)
    tokens = t.global_batch_size * T
    step_s = statistics.mean(times)
    n = param_count(m)
    fpt = flops_per_token(m, T, n)
    gpu_peak = train.peak_flops(grid.device)
    tps = tokens / step_s
    plan_bytes = plan.peak_memory(cfg, grid.tp, grid.dp)
    result = dict(
        config=args.config, overrides=overrides + ([f"--per-rank-tp {args.per_rank_tp}"] if args.per_rank_tp > 1 else []),
        device=torch.cuda.get_device_name(grid.device) if grid.device.type == "cuda" else "cpu",
        torch=torch.__version__, layout=f"tp={grid.tp} pp={grid.pp} dp={grid.dp}", params=n, global_batch=t.global_batch_size,
        micro_batch=t.micro_batch_size, seq_len=T, mean_doc_len=args.doc_len, compile=t.compile,
        activation_checkpointing=t.activation_checkpointing,
        tokens_per_sec=round(tps / grid.world, 1),  # per GPU
        tflops=round(fpt * tps / grid.world / 1e12, 1),
        mfu=round(fpt * tps / (gpu_peak * grid.world), 4) if gpu_peak else None,
        step_time_s=round(step_s, 4), step_time_min_s=round(min(times), 4),
        peak_memory_gb=round(peak, 2) if peak is not None else None, plan_gb=round(plan_bytes / 1e9, 2),
        activation_bytes_per_token_layer=round(per_layer / (t.micro_batch_size * T)) if per_layer else None,
        loss=round(loss, 4), flex_options=model_py.FLEX_KERNEL_OPTIONS, loss_chunk=model_py.LOSS_CHUNK_ELEMENTS, **saves)
    if result["mfu"] is not None and grid.pp == 1:  # a GPU whose peak is known: a row of plan.py's table
        result["plan_row"] = plan_row(cfg, args, result["overrides"], result["device"], result["mfu"], grid.tp)
    if args.compare_hf and grid.world == 1:
        hf_times, hf_peak = bench_hf(cfg, args, grid.device)
        hf_tps = tokens / statistics.mean(hf_times)
        result["hf"] = dict(tokens_per_sec=round(hf_tps, 1), mfu=round(fpt * hf_tps / gpu_peak, 4) if gpu_peak else None,
                            peak_memory_gb=round(hf_peak, 2) if hf_peak is not None else None)
        result["speedup_vs_hf"] = round(tps / hf_tps, 2)
    if grid.rank == 0:
        print(json.dumps(result))
    parallel.shutdown(grid)

if __name__ == "__main__":
    main()
