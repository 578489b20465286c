"""Tensor and data parallelism, written by hand over torch.distributed (NCCL on CUDA, gloo on CPU).

The process grid: world = tp x dp, tensor-parallel groups are consecutive ranks (so a group stays
inside a node and talks over NVLink), data-parallel groups are the ranks with the same tp_rank:

    tp=4, dp=2:   TP groups [0 1 2 3] [4 5 6 7]     DP groups [0 4] [1 5] [2 6] [3 7]

Tensor parallelism (Megatron-LM, arXiv 1909.08053), for Y = X A:

    ColumnParallelLinear  A = [A_0 | A_1 | ... ]  rank r holds columns A_r (rows of the [out, in]
                          weight): Y_r = f(X) A_r; f = identity forward, all-reduce backward
    RowParallelLinear     A = [A_0 ; A_1 ; ... ]  rank r holds rows A_r: Y = g(sum_r X_r A_r);
                          g = all-reduce forward, identity backward

q/k/v and up_proj are column-parallel (each rank owns n_heads/tp query heads, n_kv_heads/tp KV heads,
ff/tp MLP features), o_proj and down_proj row-parallel: one all-reduce per sublayer forward, one
backward. The embedding and the head are split over the vocabulary; the loss is computed on the
vocab shards (vocab_parallel_cross_entropy) and the full logits are never gathered.
With sequence parallelism (arXiv 2205.05198) f / g become all-gather / reduce-scatter along the
sequence, and the norms and residuals between sublayers run on [B, T/tp, d] shards.

Data parallelism is a ZeRO-1 distributed optimizer (DistributedOptimizer): gradients land in flat
fp32 buckets that are reduce-scattered while backward goes on; each DP rank keeps fp32 master weights
and optimizer state for its 1/dp of every bucket; the updated weights are all-gathered after the step.
Debugging: start with check_replicas(model), which says which replicated tensor differs across ranks.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ParallelConfig:
    """The [parallel] section."""
    tp: int = 1                      # tensor-parallel degree (GPUs of one node share a layer)
    dp: int = 0                      # data-parallel degree, for --plan only; at run time world / tp
    sequence_parallel: bool = False  # norms and residuals on sequence shards (saves activations)
    bucket_size: int = 25_000_000    # gradient elements per reduce-scatter bucket


class LayoutError(ValueError):
    pass


@dataclass
class Grid:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    tp: int = 1
    dp: int = 1
    tp_rank: int = 0
    dp_rank: int = 0
    tp_group: object = None
    dp_group: object = None
    device: torch.device = torch.device("cpu")
    sequence_parallel: bool = False


def env_rank():
    """(rank, world, local_rank) from torchrun's environment, else Slurm's (srun python train.py)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), int(os.environ["SLURM_LOCALID"])
    return 0, 1, 0


def check_layout(cfg, world, tp, dp=None, global_batch=None, micro_batch=None, seq_len=None, sp=False):
    """Refuse a layout that does not fit, before anything is allocated, naming the numbers."""
    dp = dp or world // tp
    problems = []
    if tp < 1 or world % tp:
        problems.append(f"world size {world} is not divisible by tp={tp}")
    for what, n in (("KV heads", cfg.num_key_value_heads), ("query heads", cfg.num_attention_heads),
                    ("vocab size", cfg.vocab_size), ("MLP width", cfg.intermediate_size)):
        if n % tp:
            problems.append(f"tp={tp} does not divide the {what} ({n})")
    if global_batch is not None and global_batch % (dp * micro_batch):
        problems.append(f"global_batch_size {global_batch} is not divisible by dp={dp} x "
                        f"micro_batch_size {micro_batch}")
    if sp and seq_len is not None and seq_len % tp:
        problems.append(f"sequence parallelism needs seq_len {seq_len} divisible by tp={tp}")
    if problems:
        raise LayoutError("layout refused: " + "; ".join(problems))


def init_distributed(pcfg: ParallelConfig, device_type: str) -> Grid:
    rank, world, local_rank = env_rank()
    device = torch.device(f"cuda:{local_rank}" if device_type == "cuda" else "cpu")
    if world > 1:
        if device_type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=world,
                                device_id=device if device_type == "cuda" else None)
    tp, dp = pcfg.tp, world // pcfg.tp
    g = Grid(rank, world, local_rank, tp, dp, rank % tp, rank // tp, None, None, device,
             pcfg.sequence_parallel and tp > 1)
    if world > 1:  # every rank creates every group, in the same order
        for i in range(dp):
            ranks = list(range(i * tp, (i + 1) * tp))
            grp = dist.new_group(ranks)
            if rank in ranks:
                g.tp_group = grp
        for j in range(tp):
            ranks = list(range(j, world, tp))
            grp = dist.new_group(ranks)
            if rank in ranks:
                g.dp_group = grp
    return g


def _size(group):
    return 1 if group is None else dist.get_world_size(group)


# ----------------------------------------------------------------------------- f / g operators
def _gather_seq(x, group):  # [B, T/tp, ...] -> [B, T, ...]
    xt = x.transpose(0, 1).contiguous()
    out = xt.new_empty((xt.shape[0] * _size(group), *xt.shape[1:]))
    dist.all_gather_into_tensor(out, xt, group=group)
    return out.transpose(0, 1)


def _reduce_scatter_seq(x, group):  # [B, T, ...] -> summed [B, T/tp, ...]
    xt = x.transpose(0, 1).contiguous()
    out = xt.new_empty((xt.shape[0] // _size(group), *xt.shape[1:]))
    dist.reduce_scatter_tensor(out, xt, group=group)
    return out.transpose(0, 1)


def _all_reduce(x, group):
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


class CopyToTP(torch.autograd.Function):
    """f: identity forward, all-reduce of the input gradient backward."""
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class ReduceFromTP(torch.autograd.Function):
    """g: all-reduce forward, identity backward."""
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class GatherFromSP(torch.autograd.Function):
    """f under sequence parallelism: all-gather along the sequence, reduce-scatter backward."""
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_seq(grad, ctx.group), None


class ReduceScatterToSP(torch.autograd.Function):
    """g under sequence parallelism: reduce-scatter along the sequence, all-gather backward."""
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group), None


def _f(x, group, sp):
    return GatherFromSP.apply(x, group) if sp else CopyToTP.apply(x, group)


def _g(x, group, sp):
    return ReduceScatterToSP.apply(x, group) if sp else ReduceFromTP.apply(x, group)


# ----------------------------------------------------------------------------- parallel layers
class ColumnParallelLinear(nn.Module):
    """weight [out/tp, in]: rank r computes output features r*out/tp .. (r+1)*out/tp - 1."""
    tp_dim = 0

    def __init__(self, in_features, out_features, grid: Grid):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features // grid.tp, in_features))
        self.full_shape = (out_features, in_features)
        self.group, self.sp = grid.tp_group, grid.sequence_parallel

    def forward(self, x):
        return F.linear(_f(x, self.group, self.sp), self.weight)


class RowParallelLinear(nn.Module):
    """weight [out, in/tp]: rank r takes input features r*in/tp .. and the partial outputs are summed."""
    tp_dim = 1

    def __init__(self, in_features, out_features, grid: Grid):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features // grid.tp))
        self.full_shape = (out_features, in_features)
        self.group, self.sp = grid.tp_group, grid.sequence_parallel

    def forward(self, x):
        return _g(F.linear(x, self.weight), self.group, self.sp)


class VocabParallelEmbedding(nn.Module):
    """weight [V/tp, d]: rank r embeds ids r*V/tp .. (r+1)*V/tp - 1, zeros elsewhere; g sums them."""
    tp_dim = 0

    def __init__(self, num_embeddings, dim, grid: Grid):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings // grid.tp, dim))
        self.full_shape = (num_embeddings, dim)
        self.start = grid.tp_rank * (num_embeddings // grid.tp)
        self.group, self.sp = grid.tp_group, grid.sequence_parallel

    def forward(self, ids):
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)
        return _g(x, self.group, self.sp)


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy on vocab shards [B, T, V/tp] (nanotron / Megatron): all-reduce the max, the target
    logit and the sum of exp; the [B, T, V] logits never exist on one rank."""
    @staticmethod
    def forward(ctx, logits, targets, group):
        logits = logits.float()
        vocab = logits.shape[-1]
        start = dist.get_rank(group) * vocab
        m = logits.max(-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        logits = logits - m[..., None]
        local = targets - start
        inside = (local >= 0) & (local < vocab)
        local = local.masked_fill(~inside, 0)
        target_logit = logits.gather(-1, local[..., None])[..., 0] * inside
        dist.all_reduce(target_logit, group=group)
        exp = logits.exp()
        sum_exp = exp.sum(-1)
        dist.all_reduce(sum_exp, group=group)
        ctx.save_for_backward(exp.div_(sum_exp[..., None]), local, inside)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad):  # d loss / d logits = softmax - onehot(target)
        softmax, local, inside = ctx.saved_tensors
        softmax.scatter_add_(-1, local[..., None], -inside[..., None].to(softmax.dtype))
        return softmax * grad[..., None], None, None


def vocab_parallel_cross_entropy(group):
    def loss_fn(logits, targets, loss_mask):
        return VocabParallelCrossEntropy.apply(logits, targets, group) * loss_mask
    return loss_fn


def parallelize(model, grid: Grid):
    """Swap the model's linears and embedding for their tensor-parallel versions, in place (call it on
    the meta device: the new layers have shard shapes and are filled later by init or a checkpoint)."""
    if grid.tp == 1:
        return model
    cfg = model.config
    swapped = 0
    for block in model.model.layers:
        a, m = block.self_attn, block.mlp
        for parent, name, kind in ((a, "q_proj", ColumnParallelLinear), (a, "k_proj", ColumnParallelLinear),
                                   (a, "v_proj", ColumnParallelLinear), (a, "o_proj", RowParallelLinear),
                                   (m, "up_proj", ColumnParallelLinear), (m, "down_proj", RowParallelLinear)):
            old = getattr(parent, name)
            setattr(parent, name, kind(old.in_features, old.out_features, grid))
            swapped += 1
    model.model.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, grid)
    model.lm_head = ColumnParallelLinear(cfg.hidden_size, cfg.vocab_size, grid)
    model.loss_fn = vocab_parallel_cross_entropy(grid.tp_group)
    # assert, not hope: every matmul of every block is now a parallel layer
    assert swapped == 6 * cfg.num_hidden_layers and not any(
        type(mod) is nn.Linear for mod in model.modules()), "a linear layer was not parallelised"
    return model


def tp_dim(model, name):
    """The dimension a parameter is split along under TP, or None where it is replicated."""
    return getattr(model.get_submodule(name.rsplit(".", 1)[0]), "tp_dim", None)


def tp_partial_grad(name, grid: Grid):
    """Replicated parameters whose gradient each TP rank only sees part of, so it is summed over TP:
    QK-norm (each rank holds some heads), xIELU scalars (some MLP features), and with sequence
    parallelism the norms that run on sequence shards."""
    if grid.tp == 1:
        return False
    if name.endswith(("q_norm.weight", "k_norm.weight", "act_fn.alpha_p", "act_fn.alpha_n")):
        return True
    return grid.sequence_parallel and name.endswith("norm.weight")


def shard_of(full, dim, grid: Grid):
    return full if dim is None else full.chunk(grid.tp, dim)[grid.tp_rank]


# ----------------------------------------------------------------------------- ZeRO-1 optimizer
@dataclass
class Piece:
    """The part of one parameter that this DP rank owns: elements [start, end) of the flattened
    TP-local parameter, at [offset, offset + end - start) of its bucket's shard."""
    name: str
    start: int
    end: int
    bucket: int
    offset: int


class DistributedOptimizer:
    """ZeRO-1 around any torch optimizer. Model parameters (bf16 or fp32) are views into one flat
    buffer; gradients accumulate into a flat fp32 buffer through post-accumulate-grad hooks; on the last
    micro-step each bucket is reduce-scattered over DP as soon as its last gradient has arrived. The
    optimizer sees only this rank's fp32 master pieces (one tensor per piece, so param groups still
    choose weight decay per parameter), and step() all-gathers the updated weights back."""

    def __init__(self, model, grid: Grid, make_optimizer, bucket_size=25_000_000):
        self.model, self.grid = model, grid
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.sync = True  # set False before the forward of micro-steps that only accumulate
        dp = grid.dp
        # backward produces gradients from the last layer to the first: fill buckets in that order
        self.index, self.buckets, names, pos, start = {}, [], [], 0, 0  # index: name -> (offset, bucket)
        for n, p in reversed(self.params):
            self.index[n] = (pos, len(self.buckets))
            names.append(n)
            pos += p.numel()
            if pos - start >= bucket_size or n == self.params[0][0]:
                size = -(-(pos - start) // dp) * dp  # padded so reduce-scatter splits it evenly
                self.buckets.append(dict(start=start, size=size, names=names, ready=0, work=None))
                names, pos, start = [], start + size, start + size
        p0 = self.params[0][1]
        self.param_buffer = torch.zeros(pos, dtype=p0.dtype, device=p0.device)
        self.grad_buffer = torch.zeros(pos, dtype=torch.float32, device=p0.device)
        self.shard_grads = [torch.zeros(b["size"] // dp, device=p0.device) for b in self.buckets]
        for n, p in self.params:
            off = self.index[n][0]
            self.param_buffer[off:off + p.numel()].copy_(p.detach().flatten())
            p.data = self.param_buffer[off:off + p.numel()].view_as(p)
            p.register_post_accumulate_grad_hook(self._grad_hook(n))
        # this rank's pieces: the intersection of each parameter with its bucket's DP shard
        self.pieces, masters = [], []
        named = dict(self.params)
        for n, p in self.params:
            off, b_id = self.index[n]
            b = self.buckets[b_id]
            lo = b["start"] + grid.dp_rank * b["size"] // dp
            hi = lo + b["size"] // dp
            s, e = max(off, lo), min(off + p.numel(), hi)
            if s < e:
                self.pieces.append(Piece(n, s - off, e - off, b_id, s - lo))
                masters.append(named[n].detach().flatten()[s - off:e - off].float().clone())
        self.masters = masters
        for piece, m in zip(self.pieces, masters):
            m.grad = self.shard_grads[piece.bucket][piece.offset:piece.offset + m.numel()]
        self.optimizer = make_optimizer([(pc.name, m) for pc, m in zip(self.pieces, masters)])
        self.partial = [i for i, pc in enumerate(self.pieces) if tp_partial_grad(pc.name, grid)]
        self.replicated = {pc.name for pc in self.pieces if tp_dim(model, pc.name) is None}

    def _grad_hook(self, name):
        def hook(p):
            off, b_id = self.index[name]
            self.grad_buffer[off:off + p.numel()].add_(p.grad.flatten())
            p.grad = None
            if self.sync:
                b = self.buckets[b_id]
                b["ready"] += 1
                if b["ready"] == len(b["names"]):
                    self._reduce_scatter(b_id)
        return hook

    def _reduce_scatter(self, b_id):
        b = self.buckets[b_id]
        full = self.grad_buffer[b["start"]:b["start"] + b["size"]]
        if self.grid.dp == 1:
            self.shard_grads[b_id].copy_(full)
        else:  # sum over DP: the loss is already normalised by the global token count
            b["work"] = dist.reduce_scatter_tensor(self.shard_grads[b_id], full, group=self.grid.dp_group,
                                                   async_op=True)
        b["ready"] = -1  # launched

    def finish_grads(self):
        for b_id, b in enumerate(self.buckets):
            if b["ready"] != -1:  # a bucket holding a parameter that got no gradient this step
                self._reduce_scatter(b_id)
            if b["work"] is not None:
                b["work"].wait()
                b["work"] = None
            b["ready"] = 0
        if self.partial and self.grid.tp > 1:  # summed over TP, after the DP sum (both are linear)
            flat = torch.cat([self.masters[i].grad for i in self.partial])
            dist.all_reduce(flat, group=self.grid.tp_group)
            for i, g in zip(self.partial, flat.split([self.masters[i].numel() for i in self.partial])):
                self.masters[i].grad.copy_(g)
        self.grad_buffer.zero_()

    def grad_norm(self):
        """The true global norm: every element counted once over TP and DP (replicated parameters
        only on tp_rank 0; padding is zero)."""
        sq = [m.grad for pc, m in zip(self.pieces, self.masters)
              if self.grid.tp_rank == 0 or pc.name not in self.replicated]
        total = torch.stack([g.pow(2).sum() for g in sq]).sum() if sq else torch.zeros((), device=self.grad_buffer.device)
        if self.grid.world > 1:
            dist.all_reduce(total)
        return total.sqrt()

    def step(self, lr, clip=None):
        """Reduce, clip, update. Returns the gradient norm before clipping; skips the update (and says
        so by returning a non-finite norm) when the gradients are not finite."""
        self.finish_grads()
        norm = self.grad_norm()
        if not torch.isfinite(norm):
            return norm
        if clip:
            coef = (clip / (norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_([m.grad for m in self.masters], coef)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.publish()
        return norm

    @torch.no_grad()
    def publish(self):
        """Master pieces -> the flat parameter buffer, all-gathered over DP (the model sees the update)."""
        for pc, m in zip(self.pieces, self.masters):
            b = self.buckets[pc.bucket]
            lo = b["start"] + self.grid.dp_rank * b["size"] // self.grid.dp
            self.param_buffer[lo + pc.offset:lo + pc.offset + m.numel()].copy_(m)
        if self.grid.dp > 1:
            for b in self.buckets:
                full = self.param_buffer[b["start"]:b["start"] + b["size"]]
                shard = full.chunk(self.grid.dp)[self.grid.dp_rank].clone()
                dist.all_gather_into_tensor(full, shard, group=self.grid.dp_group)


@torch.no_grad()
def check_replicas(model, grid: Grid):
    """Debug check (nanotron): every replicated tensor is identical on all the ranks that hold it.
    Returns the names that differ (empty list when all is well)."""
    bad = []
    for name, p in model.named_parameters():
        groups = [grid.dp_group] + ([grid.tp_group] if tp_dim(model, name) is None else [])
        for group in groups:
            if _size(group) > 1:
                ref = p.detach().clone()
                dist.broadcast(ref, src=dist.get_global_rank(group, 0), group=group)
                if not torch.equal(ref, p.detach()):
                    bad.append(name)
    return bad
