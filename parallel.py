"""Tensor and data parallelism, written by hand over torch.distributed (NCCL on CUDA, gloo on CPU).

The process grid: world = tp x cp x pp x dp, Megatron-LM's order: tensor-parallel groups are consecutive
ranks (so a group stays inside a node and talks over NVLink), then context parallelism, then pipeline
stages, then data parallelism; the rank at (d, p, c, t) is ((d pp + p) cp + c) tp + t:

    tp=2, pp=2, dp=2:   TP groups [0 1] [2 3] [4 5] [6 7]      stage 0: 0 1 4 5, stage 1: 2 3 6 7
                        PP groups [0 2] [1 3] [4 6] [5 7]      DP groups [0 4] [1 5] [2 6] [3 7]
    tp=2, cp=2, dp=2:   TP groups [0 1] [2 3] [4 5] [6 7]      CP groups [0 2] [1 3] [4 6] [5 7]
                        DP groups [0 4] [1 5] [2 6] [3 7]      DP x CP (ZeRO-1) [0 2 4 6] [1 3 5 7]

Tensor parallelism (Megatron-LM, arXiv 1909.08053), for Y = X A:

    ColumnParallelLinear  A = [A_0 | A_1 | ... ]  rank r holds columns A_r (rows of the [out, in]
                          weight): Y_r = f(X) A_r; f = identity forward, all-reduce backward
    RowParallelLinear     A = [A_0 ; A_1 ; ... ]  rank r holds rows A_r: Y = g(sum_r X_r A_r);
                          g = all-reduce forward, identity backward

q/k/v and up_proj are column-parallel (each rank owns n_heads/tp query heads, n_kv_heads/tp KV heads, ff/tp MLP
features), o_proj and down_proj row-parallel. f is applied ONCE to the input of the attention (shared by q, k and v)
and once to the MLP's: one collective per sublayer forward and one backward, 4 per block in all, as Megatron-LM. The
embedding and the head are split over the vocabulary, and so is the loss (model.LMHeadLoss, with all-reduces of the
max, the target logit and the sum of exp). With sequence parallelism (arXiv 2205.05198) f / g become all-gather /
reduce-scatter along the sequence, and the norms and residuals between sublayers run on [B, T/tp, d] slices (4
all-gathers and 4 reduce-scatters a block).

Data parallelism is a ZeRO-1 distributed optimizer (DistributedOptimizer): gradients land in flat fp32 buckets
reduce-scattered while backward goes on; each DP rank keeps fp32 master weights and optimizer state for its partition
(1/dp) of every bucket; after the step the updated weights are all-gathered back asynchronously, bucket by bucket,
each block waiting only for its own just before its forward (Megatron's overlapped parameter gather).

Context parallelism (Llama 3, arXiv 2407.21783, 3.3.2): a CP group's ranks hold two chunks each of every
sequence (cp_positions); attention all-gathers K and V over the group and reduce-scatters their gradients
(GatherKV), all else runs on the rank's own tokens. ZeRO-1 partitions over the dp x cp weight replicas.

Pipeline parallelism (Megatron-LM's 1F1B schedule, picotron's pipeline file): stage s holds layers
[s L/pp, (s+1) L/pp), the first also the embedding, the last the final norm, the head and the loss;
activations and their gradients go point-to-point between neighbouring stages (pipeline_1f1b), or round
a ring of them V times with virtual_stages = V, Megatron's interleaved schedule (pipeline_interleaved).

Words: a tensor-parallel rank holds a *slice* of a weight; a data-parallel rank owns a *partition* of each
gradient bucket, and its *pieces* are the parts of parameters that fall in that partition. Debugging: start with
check_replicas(model), which says which replicated tensor differs across ranks.
"""
import contextlib
import itertools
import os
import sys
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  now, before any group exists: see shutdown
import torch.nn as nn
import torch.nn.functional as F

from model import lm_head_loss, role_of

@dataclass
class ParallelConfig:
    """The [parallel] section."""
    tp: int = 1                      # tensor-parallel degree (GPUs of one node share a layer)
    cp: int = 1                      # context-parallel degree: each sequence split over cp ranks (long context)
    pp: int = 1                      # pipeline stages (the layers split evenly over them)
    dp: int = 0                      # data-parallel degree, for --plan only; at run time world / (tp x cp x pp)
    sequence_parallel: bool = False  # norms and residuals on sequence slices (saves activations)
    virtual_stages: int = 1          # model chunks per pipeline rank: > 1 is the interleaved 1F1B schedule
    bucket_size: int = 25_000_000    # gradient elements per reduce-scatter bucket

class LayoutError(ValueError):
    """A layout that does not fit the model or the world: the same on every rank."""

class LaunchError(RuntimeError):
    """A rank's environment does not let it join the others (a missing rendezvous address)."""

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
    pp: int = 1
    pp_rank: int = 0
    pp_group: object = None
    cp: int = 1
    cp_rank: int = 0
    cp_group: object = None
    dp_cp_group: object = None  # the dp x cp ranks of one (tp_rank, stage), which share every weight: ZeRO-1's
    virtual_stages: int = 1
    dp_cp = property(lambda self: self.dp * self.cp)  # (Megatron's "data-parallel group with context parallelism")
    dp_cp_rank = property(lambda self: self.dp_rank * self.cp + self.cp_rank)
    first_stage = property(lambda self: self.pp_rank == 0)
    last_stage = property(lambda self: self.pp_rank == self.pp - 1)

def rank_at(d, p, c, t, pp, cp, tp):  # the rank at grid position (d, p, c, t) of a layout, in Megatron-LM's order
    return ((d * pp + p) * cp + c) * tp + t

def env_rank():
    """(rank, world, local_rank) from torchrun's environment, else from srun's own: SLURM_STEP_NUM_TASKS is set
    for the tasks of a job step, not for the batch script, so `python train.py` typed inside an sbatch
    allocation is one process, not rank 0 of SLURM_NTASKS ranks that will never come."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if int(os.environ.get("SLURM_STEP_NUM_TASKS", 1)) > 1:
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_STEP_NUM_TASKS"]), int(os.environ["SLURM_LOCALID"])
    return 0, 1, 0

def check_layout(cfg, world, tp, dp=None, global_batch=None, micro_batch=None, seq_len=None, sp=False, pp=1, cp=1, vp=1):
    """Refuse a layout that does not fit, before anything is allocated, naming the numbers."""
    if min(tp, cp, pp) < 1:
        raise LayoutError(f"layout refused: tp={tp}, cp={cp} and pp={pp} must be at least 1")
    dp = dp or world // (tp * cp * pp)
    problems = []
    if world % (tp * cp * pp):
        problems.append(f"world size {world} is not divisible by tp x cp x pp = {tp} x {cp} x {pp}")
    for what, n in (("KV heads", cfg.num_key_value_heads), ("query heads", cfg.num_attention_heads),
                    ("vocab size", cfg.vocab_size), ("MLP width", cfg.intermediate_size)):
        if n % tp:
            problems.append(f"tp={tp} does not divide the {what} ({n})")
    if vp != 1 and (vp < 1 or pp == 1):
        problems.append(f"virtual_stages={vp} must be 1, or more with pp > 1")
    if cfg.num_hidden_layers % (pp * max(vp, 1)):
        problems.append(f"pp={pp}{f' x virtual_stages={vp}' if vp > 1 else ''} does not divide the {cfg.num_hidden_layers} layers")
    if vp > 1 and global_batch is not None and dp >= 1 and (micro := global_batch // (dp * micro_batch)) % pp:
        problems.append(f"the interleaved schedule needs the micro-batches ({micro}) to be a multiple of pp={pp}")
    if global_batch is not None and dp >= 1 and global_batch % (dp * micro_batch):
        problems.append(f"global_batch_size {global_batch} is not divisible by dp={dp} x "
                        f"micro_batch_size {micro_batch}")
    if cp > 1 and seq_len is not None and seq_len % (2 * cp):
        problems.append(f"context parallelism needs seq_len {seq_len} divisible by 2 x cp = {2 * cp}")
    if sp and seq_len is not None and seq_len % (cp * tp):
        problems.append(f"sequence parallelism needs seq_len {seq_len} divisible by cp x tp = {cp * tp}")
    if problems:
        raise LayoutError("layout refused: " + "; ".join(problems))

def init_distributed(pcfg: ParallelConfig, device_type: str) -> Grid:
    rank, world, local_rank = env_rank()
    device = torch.device(f"cuda:{local_rank}" if device_type == "cuda" else "cpu")
    if world > 1:
        if "MASTER_ADDR" not in os.environ:
            raise LaunchError(f"rank {rank} of {world} (from Slurm) needs MASTER_ADDR and MASTER_PORT exported "
                              f"to find rank 0: export them, or launch with torchrun (configs/alps.sbatch)")
        os.environ.setdefault("MASTER_PORT", "29500")
        if device_type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=world,
                                device_id=device if device_type == "cuda" else None)
    tp, cp, pp = pcfg.tp, pcfg.cp, pcfg.pp
    dp = world // (tp * cp * pp)
    g = Grid(rank, world, local_rank, tp, dp, rank % tp, rank // (tp * cp * pp), None, None, device,
             pcfg.sequence_parallel and tp > 1, pp, (rank // (tp * cp)) % pp, None, cp, (rank // tp) % cp,
             virtual_stages=pcfg.virtual_stages)
    if world > 1:  # one call each, made by every rank with the same lists: the groups all ranks agree on
        def group(*axes):  # the ranks that differ only along axes of (d, p, c, t)
            out = {}
            for at in itertools.product(range(dp), range(pp), range(cp), range(tp)):
                out.setdefault(tuple(v for i, v in enumerate(at) if i not in axes), []).append(rank_at(*at, pp, cp, tp))
            return dist.new_subgroups_by_enumeration(list(out.values()))[0]
        g.tp_group, g.pp_group, g.dp_group = group(3), group(1), group(0)
        g.cp_group, g.dp_cp_group = (group(2), group(0, 2)) if cp > 1 else (None, g.dp_group)
    return g

def shutdown(grid: Grid, opt=None):
    """Leave cleanly (README, Debugging): finish this rank's collectives, wait at a barrier for every rank (none
    tears its groups down while another still talks to it), destroy the groups and drop the grid's references to
    them, the last ones (layers read the groups from the grid; an autograd graph through one holds its group
    too: a caller drops it first), so that their threads are joined here, while the interpreter is whole. A gloo
    thread frees a finished collective's tensors a moment after wait() returned: once the interpreter has begun
    to exit, that needs a GIL that is gone, and the C++ runtime aborts a run that succeeded ("terminate called
    without an active exception"). torch.distributed.nn, imported lazily by torch (with dynamo), would keep the
    world group as its functions' default argument: this module imports it before any group exists."""
    if opt is not None:
        opt.wait_params()
    if grid.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        grid.tp_group = grid.pp_group = grid.dp_group = grid.cp_group = grid.dp_cp_group = None
        if left := gloo_threads():
            print(f"warning: rank {grid.rank}: {len(left)} gloo threads outlive the process groups (a reference "
                  f"to a group is left somewhere); the exit may abort after the run", file=sys.stderr)

def gloo_threads():
    """The names of this process's gloo threads (Linux; [] elsewhere)."""
    names = []
    with contextlib.suppress(OSError):
        for t in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError), open(f"/proc/self/task/{t}/comm") as f:  # a thread may end meanwhile
                names.append(f.read().strip())
    return [n for n in names if "gloo" in n]

def agree(grid: Grid, *flags):
    """Flags any rank raised, known to every rank (one small all-reduce): they must all stop together."""
    v = torch.tensor([float(f) for f in flags], device=grid.device)
    if grid.world > 1:
        dist.all_reduce(v, op=dist.ReduceOp.MAX)
    return [bool(x) for x in v.tolist()]

def _size(group):
    return 1 if group is None else dist.get_world_size(group)

# ----------------------------------------------------------------------------- f / g operators
def _seq(x, group, gather):  # all-gather [B, T/tp, ...] -> [B, T, ...], else reduce-scatter: summed, back to T/tp
    xt = x.transpose(0, 1).contiguous()
    out = xt.new_empty((xt.shape[0] * _size(group) if gather else xt.shape[0] // _size(group), *xt.shape[1:]))
    (dist.all_gather_into_tensor if gather else dist.reduce_scatter_tensor)(out, xt, group=group)
    return out.transpose(0, 1)

def _all_reduce(x, group):
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x

class AllReduce(torch.autograd.Function):
    """f and g without sequence parallelism: in_forward=False is f, identity forward and all-reduce of the input
    gradient backward; in_forward=True is g, all-reduce forward and identity backward."""
    @staticmethod
    def forward(ctx, x, group, in_forward):
        ctx.group, ctx.in_forward = group, in_forward
        return _all_reduce(x, group) if in_forward else x

    @staticmethod
    def backward(ctx, grad):
        return grad if ctx.in_forward else _all_reduce(grad, ctx.group), None, None

class SequenceParallel(torch.autograd.Function):
    """f and g under sequence parallelism: gather=True is f, all-gather along the sequence forward and reduce-scatter
    backward; gather=False is g, reduce-scatter along the sequence forward and all-gather backward."""
    @staticmethod
    def forward(ctx, x, group, gather):
        ctx.group, ctx.gather = group, gather
        return _seq(x, group, gather)

    @staticmethod
    def backward(ctx, grad):
        return _seq(grad, ctx.group, not ctx.gather), None, None

def _f(x, group, sp):
    return SequenceParallel.apply(x, group, True) if sp else AllReduce.apply(x, group, False)

def _g(x, group, sp):
    return SequenceParallel.apply(x, group, False) if sp else AllReduce.apply(x, group, True)

# ----------------------------------------------------------------------------- parallel layers
def _sliced(old: nn.Parameter, name: str, dim: int, grid: Grid) -> nn.Parameter:
    """An empty parameter for this rank's slice of `old` along dim, its role stamped with the split."""
    shape = [n // grid.tp if d == dim else n for d, n in enumerate(old.shape)]
    p = nn.Parameter(torch.empty(shape, dtype=old.dtype, device=old.device))
    p.role = replace(role_of(name, old), tp_dim=dim, full_shape=tuple(old.shape))
    return p

class ColumnParallelLinear(nn.Module):
    """weight [out/tp, in]: rank r computes output features r*out/tp .. (r+1)*out/tp - 1. f is applied
    to the input here unless the module that holds this layer already applied it (BLOCK_PLAN's "input")."""

    def __init__(self, old: nn.Linear, grid: Grid, gather_input=True):
        super().__init__()
        self.weight = _sliced(old.weight, "weight", 0, grid)
        self.grid, self.gather_input = grid, gather_input  # the grid, not its group: see shutdown

    def forward(self, x):
        return F.linear(_f(x, self.grid.tp_group, self.grid.sequence_parallel) if self.gather_input else x, self.weight)

class RowParallelLinear(nn.Module):
    """weight [out, in/tp]: rank r takes input features r*in/tp .. and the partial outputs are summed."""

    def __init__(self, old: nn.Linear, grid: Grid):
        super().__init__()
        self.weight = _sliced(old.weight, "weight", 1, grid)
        self.grid = grid

    def forward(self, x):
        return _g(F.linear(x, self.weight), self.grid.tp_group, self.grid.sequence_parallel)

class VocabParallelEmbedding(nn.Module):
    """weight [V/tp, d]: rank r embeds ids r*V/tp .. (r+1)*V/tp - 1, zeros elsewhere; g sums them."""

    def __init__(self, old: nn.Embedding, grid: Grid):
        super().__init__()
        self.weight = _sliced(old.weight, "weight", 0, grid)
        self.start = grid.tp_rank * self.weight.shape[0]
        self.grid = grid

    def forward(self, ids):
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)
        return _g(x, self.grid.tp_group, self.grid.sequence_parallel)

def vocab_parallel_loss(grid: Grid):
    """The loss on this rank's vocabulary slice of the head; the [B, T, V] logits never exist."""
    def all_reduce(x, op):  # op: "max" or "sum"
        dist.all_reduce(x, op=getattr(dist.ReduceOp, op.upper()), group=grid.tp_group)

    def loss_fn(h, head, targets, mask, compiled=False):
        h = _f(h, grid.tp_group, grid.sequence_parallel)  # the head's input collective
        return lm_head_loss(h, head, targets, mask, grid.tp_rank * head.weight.shape[0], all_reduce, compiled)
    return loss_fn

# The tensor-parallel plan of one block (torchtitan's parallelize_module, written out): "input" applies
# f once to the submodule's input; "column" / "row" swap an nn.Linear for its parallel version.
BLOCK_PLAN = {"self_attn": "input", "self_attn.q_proj": "column", "self_attn.k_proj": "column",
              "self_attn.v_proj": "column", "self_attn.o_proj": "row",
              "mlp": "input", "mlp.up_proj": "column", "mlp.down_proj": "row"}

def parallelize(model, grid: Grid):
    """Apply BLOCK_PLAN to every block and split the embedding and the head over the vocabulary, in place, on
    the meta device (the new layers have slice shapes, filled later by init or a checkpoint)."""
    for block in model.model.layers.values() if grid.cp > 1 else ():  # attention sees every rank's K and V
        block.self_attn.gather_kv = lambda k, v: gather_kv(k, v, grid)
    if grid.tp == 1:
        return model
    for block in model.model.layers.values():
        for path, kind in BLOCK_PLAN.items():
            old = block.get_submodule(path)
            if kind == "input":  # f once for all its column-parallel layers (torchtitan's PrepareModuleInput)
                old.register_forward_pre_hook(
                    lambda m, args: (_f(args[0], grid.tp_group, grid.sequence_parallel), *args[1:]))
                continue
            assert type(old) is nn.Linear, f"{path} is {type(old).__name__}, the plan expects nn.Linear"
            new = ColumnParallelLinear(old, grid, gather_input=False) if kind == "column" else RowParallelLinear(old, grid)
            block.set_submodule(path, new)
    if model.model.embed_tokens is not None:
        model.model.embed_tokens = VocabParallelEmbedding(model.model.embed_tokens, grid)
    if model.lm_head is not None:
        model.lm_head = ColumnParallelLinear(model.lm_head, grid)
        model.loss_fn = vocab_parallel_loss(grid)
    # assert, not hope: every matmul is now a parallel layer, every parameter has a role
    assert not any(type(m) in (nn.Linear, nn.Embedding) for m in model.modules()), "a layer was not parallelised"
    for name, p in model.named_parameters():
        role_of(name, p)
    return model

# ----------------------------------------------------------------------------- context parallelism
def cp_positions(T, cp, cp_rank, device=None):
    """The positions of a sequence of T tokens that CP rank cp_rank holds: the sequence is cut into 2 cp
    chunks and rank r holds chunks r and 2cp-1-r (Llama 3's head-tail split: under a causal mask every
    rank does the same attention work). cp = 4, T = 16:

        positions  0 1 | 2 3 | 4 5 | 6 7 | 8 9 | 10 11 | 12 13 | 14 15
        chunk       0     1     2     3     4      5       6       7
        CP rank     0     1     2     3     3      2       1       0      rank 1 holds 2 3 12 13
    """
    c = T // (2 * cp)
    return torch.cat([torch.arange(i * c, (i + 1) * c, device=device) for i in (cp_rank, 2 * cp - 1 - cp_rank)])

def cp_owner(positions, T, cp):
    """The inverse of cp_positions: (the CP rank holding each position, its index among that rank's tokens)."""
    c = T // (2 * cp)
    chunk = positions // c
    return torch.minimum(chunk, 2 * cp - 1 - chunk), positions % c + c * (chunk >= cp)

class GatherKV(SequenceParallel):
    """Context parallelism's one collective pair (Llama 3, 3.3.2): SequenceParallel's f, over the CP group."""

def gather_kv(k, v, grid: Grid):
    """k, v [B, T/cp, Hkv, D] of this rank's tokens -> [B, T, Hkv, D] each, in sequence order: one all-gather of
    both (rank after rank, put in order by cp_owner); backward, a reduce-scatter: each rank gets its own keys'
    gradient summed over every rank's queries. With GQA, K and V are small next to the rest of a block."""
    T = k.shape[1] * grid.cp
    kv = GatherKV.apply(torch.cat((k, v), 2), grid.cp_group, True)
    rank, index = cp_owner(torch.arange(T, device=k.device), T, grid.cp)
    return kv[:, rank * (T // grid.cp) + index].chunk(2, 2)

# ----------------------------------------------------------------------------- pipeline parallelism
def keep_stage(model, grid: Grid):
    """Keep this stage's share of the model (call it on the meta device, before anything is allocated):
    layers [s L/pp, (s+1) L/pp) under their global names, the embedding on the first stage, the final
    norm and the head on the last; with V virtual stages, chunks s, s + pp, ... of pp V (pipeline_interleaved)."""
    if grid.pp == 1:
        return model
    per = model.config.num_hidden_layers // (grid.pp * grid.virtual_stages)
    mine = {str(i) for i in range(model.config.num_hidden_layers) if i // per % grid.pp == grid.pp_rank}
    for name in [n for n in model.model.layers if n not in mine]:
        del model.model.layers[name]
    if not grid.first_stage:
        model.model.embed_tokens = None
    if not grid.last_stage:
        model.model.norm = model.lm_head = None
    return model

class Pipe:
    """Point-to-point sends and receives between neighbouring stages, named for the direction (picotron):
    activations go forward (to the next stage), their gradients backward. Each exchange is one batch of
    isend/irecv, so a send and a receive between the same two stages never wait on each other
    (Megatron's send_forward_recv_backward). wait_s counts the time this stage sat waiting: its bubble."""

    def __init__(self, grid: Grid, shape, dtype):
        self.grid, self.shape, self.dtype, self.wait_s = grid, shape, dtype, 0.0
        ring = [rank_at(grid.dp_rank, p, grid.cp_rank, grid.tp_rank, grid.pp, grid.cp, grid.tp) for p in range(grid.pp)]
        self.next, self.prev = ring[(grid.pp_rank + 1) % grid.pp], ring[(grid.pp_rank - 1) % grid.pp]  # a ring

    def _exchange(self, send_next=None, send_prev=None, recv_prev=False, recv_next=False):
        ops = [dist.P2POp(dist.isend, t.contiguous(), peer)
               for t, peer in ((send_next, self.next), (send_prev, self.prev)) if t is not None]
        got = {}
        for key, peer, wanted in (("prev", self.prev, recv_prev), ("next", self.next, recv_next)):
            if wanted:
                got[key] = torch.empty(self.shape, dtype=self.dtype, device=self.grid.device)
                ops.append(dist.P2POp(dist.irecv, got[key], peer))
        if ops:
            wait_for_stream(self.grid.device)  # time the wait, not the compute queued before it
            t0 = time.perf_counter()
            for req in dist.batch_isend_irecv(ops):
                req.wait()
            wait_for_stream(self.grid.device)
            self.wait_s += time.perf_counter() - t0
        return got

    def recv_forward(self):
        return None if self.grid.first_stage else self._exchange(recv_prev=True)["prev"].requires_grad_()

    def send_forward(self, y):
        if not self.grid.last_stage:
            self._exchange(send_next=y.detach())

    def recv_backward(self):
        return None if self.grid.last_stage else self._exchange(recv_next=True)["next"]

    def send_backward(self, grad):
        if not self.grid.first_stage:
            self._exchange(send_prev=grad)

    def send_forward_recv_backward(self, y):
        return None if self.grid.last_stage else self._exchange(send_next=y.detach(), recv_next=True)["next"]

    def send_backward_recv_forward(self, grad):
        if self.grid.first_stage:
            return None
        return self._exchange(send_prev=grad, recv_prev=True)["prev"].requires_grad_()

def wait_for_stream(device):
    """Wait for the work this rank queued on its current stream only: a device-wide synchronize would wait for
    the parameter all-gathers running beside it too, and undo their overlap with the next forward."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()

def _stage_backward(x, y, grad_y):
    """Backward through this stage: y is the loss on the last stage, else the activations sent on."""
    torch.autograd.backward(y, grad_y)  # grad_y None: the loss, as y.backward()
    return None if x is None else x.grad

def pipeline_1f1b(micro_steps, pipe: Pipe, opt, train=True):
    """Megatron-LM's 1F1B schedule for one global batch. micro_steps[i](hidden) runs micro-batch i on
    this stage: the loss on the last stage, else the activations for the next one. With pp = 4 stages
    and m = 6 micro-batches (F = forward, B = backward, . = waiting: the bubble, (pp-1)/(m+pp-1)):

        stage 0:  F0 F1 F2 F3 .  .  B0 F4 B1 F5 B2 .  B3 .  B4 .  B5
        stage 1:  .  F0 F1 F2 .  B0 F3 B1 F4 B2 F5 B3 .  B4 .  B5 .
        stage 2:  .  .  F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 .  B5 .  .
        stage 3:  .  .  .  F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 .  .

    Stage s first runs warmup = min(pp - s - 1, m) forwards, then alternates one forward and one backward,
    then runs the warmup's backwards: it never holds more than min(pp - s, m) micro-batches' activations.
    Returns (the sum of the micro-batch losses on the last stage, else 0; the most micro-batches held at once)."""
    grid, m = pipe.grid, len(micro_steps)
    warmup = min(grid.pp - grid.pp_rank - 1, m) if train else m  # evaluation: forwards only
    total, units, held = torch.zeros((), device=grid.device), [], 0  # units: (input, output) until their backward
    for i in range(warmup):                                      # warmup: forwards only
        x = pipe.recv_forward()
        y = micro_steps[i](x)
        pipe.send_forward(y)
        total += y.detach() if grid.last_stage else 0
        if train:
            units.append((x, y))
            held = max(held, len(units))
    if not train:
        return total, 1
    x = pipe.recv_forward() if warmup < m else None
    for i in range(warmup, m):                                   # steady: one forward, one backward
        y = micro_steps[i](x)
        total += y.detach() if grid.last_stage else 0
        grad_y = pipe.send_forward_recv_backward(y)
        units.append((x, y))
        held = max(held, len(units))
        opt.sync = i - warmup == m - 1  # the gradient buckets reduce during the last backward only
        grad_x = _stage_backward(*units.pop(0), grad_y)
        x = pipe.send_backward_recv_forward(grad_x) if i < m - 1 else pipe.send_backward(grad_x)
    for j in range(warmup):                                      # cooldown: the warmup's backwards
        grad_y = pipe.recv_backward()
        opt.sync = j == warmup - 1
        pipe.send_backward(_stage_backward(*units.pop(0), grad_y))
    return total, held

def pipeline_interleaved(micro_steps, pipe: Pipe, opt, train=True):
    """Megatron-LM's interleaved 1F1B (Narayanan et al. 2021, arXiv 2104.04473, section 2.2): rank s holds V
    chunks of layers, chunk c being virtual stage c pp + s of pp V (keep_stage), so a micro-batch goes V times
    round the ring and the bubble shrinks V-fold, to (pp-1)/(V m) of the work. A rank runs its m V forward
    units in the order (group of pp micro-batches, chunk, micro-batch), its backward units likewise with the
    chunks reversed: forward unit k in round s + k, backward unit k in round (V+1) pp - s - 2 + k; a round
    ends in one exchange with both neighbours, whose arrivals the next round uses. pp = 2, V = 2, m = 4
    (F/B: forward / backward, a/b: chunk 0/1, then the micro-batch; rank 1's chunk b is the last stage):

        round:  0   1   2   3       4       5       6       7       8       9       10  11
        rank 0: Fa0 Fa1 Fb0 Fb1     Fa2 Bb0 Fa3 Bb1 Fb2 Ba0 Fb3 Ba1 Bb2     Bb3     Ba2 Ba3
        rank 1: .   Fa0 Fa1 Fb0 Bb0 Fb1 Bb1 Fa2 Ba0 Fa3 Ba1 Fb2 Bb2 Fb3 Bb3 Ba2     Ba3 .

    Rank s holds at most (V+1) pp - 2s - 1 units' activations. Returns what pipeline_1f1b returns."""
    grid, m, V = pipe.grid, len(micro_steps), pipe.grid.virtual_stages
    pp, s, n = grid.pp, grid.pp_rank, len(micro_steps) * V

    def unit(k, backward=False):  # a rank's k-th forward (backward) unit -> (micro-batch, chunk)
        group, j = divmod(k, pp * V)
        return group * pp + j % pp, V - 1 - j // pp if backward else j // pp
    first_b = lambda rank: (V + 1) * pp - rank - 2  # noqa: E731  the round of a rank's first backward
    # whether a rank sends in round r: a forward's output on (not the loss), a backward's input gradient back
    sends_fwd = lambda r, rank: 0 <= r - rank < n and (rank, unit(r - rank)[1]) != (pp - 1, V - 1)  # noqa: E731
    sends_bwd = lambda r, rank: (train and 0 <= r - first_b(rank) < n  # noqa: E731
                                 and (rank, unit(r - first_b(rank), True)[1]) != (0, 0))
    total, held, most, x, grad_y = torch.zeros((), device=grid.device), {}, 0, None, None
    for r in range(first_b(0) + n if train else pp - 1 + n):
        y = grad_x = None
        if 0 <= r - s < n:
            i, c = unit(r - s)
            y = micro_steps[i](x, (c, V))
            total += y.detach() if y.dim() == 0 else 0
            if train:
                held[i, c] = (x, y)
                most = max(most, len(held))
        if train and 0 <= r - first_b(s) < n:
            i, c = unit(r - first_b(s), backward=True)
            opt.sync = i == m - 1  # a chunk's last backward: its gradient buckets reduce, once a step
            grad_x = _stage_backward(*held.pop((i, c)), grad_y)
        got = pipe._exchange(send_next=y.detach() if sends_fwd(r, s) else None,
                             send_prev=grad_x if sends_bwd(r, s) else None,
                             recv_prev=sends_fwd(r, (s - 1) % pp), recv_next=sends_bwd(r, (s + 1) % pp))
        x, grad_y = got["prev"].requires_grad_() if "prev" in got else None, got.get("next")
    return total, most

def tp_slice(full, role, grid: Grid):
    """This rank's slice of a full tensor (the whole tensor where the role says it is not split)."""
    return full if role.tp_dim is None else full.chunk(grid.tp, role.tp_dim)[grid.tp_rank]

def tp_grad_is_partial(role, grid: Grid) -> bool:
    """Replicated parameters whose gradient each TP rank only sees part of, summed over TP."""
    return grid.tp > 1 and (role.tp_partial_grad or (grid.sequence_parallel and role.sequence_parallel))

# ----------------------------------------------------------------------------- ZeRO-1 optimizer
ALIGN = 64  # every parameter starts at a multiple of 64 elements in the flat buffers (Megatron-LM pads
# the same way): 128-byte aligned views in bf16, 256 in fp32, which Inductor's CUDA kernels assume

def _align(n, to=ALIGN):
    return -(-n // to) * to

@dataclass
class Piece:
    """The part of one parameter that this DP rank owns: elements [start, end) of the flattened
    TP-local parameter, at [offset, offset + end - start) of its bucket's partition."""
    name: str
    start: int
    end: int
    bucket: int
    offset: int

@dataclass
class Bucket:
    start: int          # offset in the flat buffers
    size: int           # elements, a multiple of ALIGN x dp
    names: list
    ready: int = 0      # gradients arrived this step (-1: reduce-scatter launched)
    reduce_work: object = None
    gather_work: object = None

def zero_layout(named_numels, dp, bucket_size):
    """The flat-buffer layout of ZeRO-1, a pure function of the parameters (name, numel) in model order,
    dp and bucket_size: name -> (offset, bucket), and the buckets. Checkpoints recompute it for the
    layout that wrote them, to know which file holds which piece without opening any."""
    index, buckets, names, pos, start = {}, [], [], 0, 0
    # backward produces gradients from the last layer to the first: fill buckets in that order
    for n, numel in reversed(named_numels):
        pos = _align(pos)
        index[n] = (pos, len(buckets))
        names.append(n)
        pos += numel
        if pos - start >= bucket_size or n == named_numels[0][0]:
            size = _align(pos - start, ALIGN * dp)  # each DP partition starts aligned too
            buckets.append(Bucket(start, size, names))
            names, pos, start = [], start + size, start + size
    return index, buckets

def zero_pieces(index, buckets, numels, dp_rank, dp):
    """The pieces DP rank dp_rank owns: each parameter's intersection with its bucket's partition."""
    pieces = []
    for n, numel in numels.items():
        off, b_id = index[n]
        b = buckets[b_id]
        lo = b.start + dp_rank * (b.size // dp)
        s, e = max(off, lo), min(off + numel, lo + b.size // dp)
        if s < e:
            pieces.append(Piece(n, s - off, e - off, b_id, s - lo))
    return pieces

class DistributedOptimizer:
    """ZeRO-1 (module docstring) around an optimizer of this project (train.AdEMAMix, train.AdamW). Parameters
    (bf16 or fp32) are views into one flat buffer, gradients accumulate into a flat fp32 one through
    post-accumulate-grad hooks; the optimizer sees only this rank's fp32 master pieces (one tensor per
    piece, so each keeps its parameter's weight decay)."""

    def __init__(self, model, grid: Grid, make_optimizer, bucket_size=25_000_000):
        self.model, self.grid, self.bucket_size = model, grid, bucket_size
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.roles = {n: role_of(n, p) for n, p in self.params}
        self.sync = True  # set False before the forward of micro-steps that only accumulate
        dp = grid.dp_cp  # weights are replicated over dp x cp: partitioned over both
        self.index, self.buckets = zero_layout([(n, p.numel()) for n, p in self.params], dp, bucket_size)
        p0 = self.params[0][1]
        size = self.buckets[-1].start + self.buckets[-1].size
        self.param_buffer = torch.zeros(size, dtype=p0.dtype, device=p0.device)
        self.grad_buffer = torch.zeros(size, dtype=torch.float32, device=p0.device)
        # this rank's partition of each bucket's gradients: with dp = 1 the buffer itself, no copy
        self.partition_grads = [self.grad_buffer[b.start:b.start + b.size] if dp == 1 else
                                torch.zeros(b.size // dp, device=p0.device) for b in self.buckets]
        for n, p in self.params:
            off = self.index[n][0]
            p.data = self.param_buffer[off:off + p.numel()].view_as(p).copy_(p.detach())
            p.register_post_accumulate_grad_hook(self._grad_hook(n))
        self.pieces = zero_pieces(self.index, self.buckets, {n: p.numel() for n, p in self.params}, grid.dp_cp_rank, dp)
        named = dict(self.params)
        self.masters = [named[pc.name].detach().flatten()[pc.start:pc.end].float().clone() for pc in self.pieces]
        for piece, m in zip(self.pieces, self.masters):
            m.grad = self.partition_grads[piece.bucket][piece.offset:piece.offset + m.numel()]
        self.optimizer = make_optimizer([self.roles[pc.name] for pc in self.pieces], self.masters)
        self.partial_grads = [m.grad for pc, m in zip(self.pieces, self.masters)
                              if tp_grad_is_partial(self.roles[pc.name], grid)]
        self._register_param_waits()

    # --------------------------------------------------------------- gradients: reduce-scatter
    def _grad_hook(self, name):
        def hook(p):
            off, b_id = self.index[name]
            self.grad_buffer[off:off + p.numel()].add_(p.grad.flatten())
            p.grad = None
            if self.sync:
                b = self.buckets[b_id]
                b.ready += 1
                if b.ready == len(b.names):
                    self._reduce_scatter(b_id)
        return hook

    def _reduce_scatter(self, b_id):
        b = self.buckets[b_id]
        if self.grid.dp_cp > 1:  # sum over DP and CP: the loss is already normalised by the global token count
            full = self.grad_buffer[b.start:b.start + b.size]
            b.reduce_work = dist.reduce_scatter_tensor(self.partition_grads[b_id], full,
                                                       group=self.grid.dp_cp_group, async_op=True)
        b.ready = -1  # launched

    def finish_grads(self):
        """Wait for every bucket's reduce-scatter (launching those that got no gradient this step), then
        sum the TP-partial gradients over TP (after the DP sum: both are linear)."""
        for b_id, b in enumerate(self.buckets):
            if b.ready != -1:
                self._reduce_scatter(b_id)
            if b.reduce_work is not None:
                b.reduce_work.wait()
                b.reduce_work = None
            b.ready = 0
        if self.partial_grads and self.grid.tp > 1:
            flat = torch.cat(self.partial_grads)
            dist.all_reduce(flat, group=self.grid.tp_group)
            torch._foreach_copy_(self.partial_grads, flat.split([g.numel() for g in self.partial_grads]))

    def zero_grads(self):
        self.grad_buffer.zero_()
        if self.grid.dp_cp > 1:  # else the partitions are views of the buffer
            torch._foreach_zero_(self.partition_grads)

    def grad_norm(self):
        """The true global norm: every element counted once over TP and DP (replicated parameters
        only on tp_rank 0; padding is zero)."""
        sq = [m.grad for pc, m in zip(self.pieces, self.masters)
              if self.grid.tp_rank == 0 or self.roles[pc.name].tp_dim is not None]
        total = torch.stack([g.pow(2).sum() for g in sq]).sum() if sq else torch.zeros((), device=self.grad_buffer.device)
        if self.grid.world > 1:
            dist.all_reduce(total)
        return total.sqrt()

    def step(self, lr, clip=None):
        """Reduce, clip, update, gather. Returns the gradient norm before clipping; skips the update
        (and says so by returning a non-finite norm) when the gradients are not finite."""
        self.finish_grads()
        norm = self.grad_norm()
        if torch.isfinite(norm):
            if clip:  # scaled by min(1, clip / norm)
                torch._foreach_mul_([m.grad for m in self.masters], (clip / (norm + 1e-6)).clamp(max=1.0))
            self.optimizer.step(lr)
            self.publish()
        self.zero_grads()
        return norm

    def skip_step(self):
        """Drop this step's gradients (a non-finite loss)."""
        self.finish_grads()
        self.zero_grads()

    # --------------------------------------------------------------- weights: all-gather
    @torch.no_grad()
    def publish(self):
        """Master pieces -> this rank's partition of the parameter buffer, then every bucket is
        all-gathered asynchronously, in the order the forward uses them (the first layers' buckets first)."""
        for pc, m in zip(self.pieces, self.masters):
            start = self.index[pc.name][0] + pc.start  # = its partition's start + pc.offset
            self.param_buffer[start:start + m.numel()].copy_(m)
        if self.grid.dp_cp == 1:
            return
        for b in reversed(self.buckets):
            full = self.param_buffer[b.start:b.start + b.size]
            mine = full.chunk(self.grid.dp_cp)[self.grid.dp_cp_rank]  # in place (NCCL); gloo needs a separate input
            b.gather_work = dist.all_gather_into_tensor(full, mine.clone() if dist.get_backend() == "gloo" else mine,
                                                        group=self.grid.dp_cp_group, async_op=True)

    def wait_params(self, buckets=None):
        for b in self.buckets if buckets is None else [self.buckets[i] for i in buckets]:
            if b.gather_work is not None:
                b.gather_work.wait()
                b.gather_work = None

    def _register_param_waits(self):
        """Forward pre-hooks on the model's units (embedding, each block, the final norm, which also
        waits for the head): a unit waits only for the buckets that hold its parameters. The hooks run
        outside the compiled block forwards (model.compile_blocks compiles forward, not __call__)."""
        if self.grid.dp_cp == 1:
            return
        m = self.model
        units = [(m.model.embed_tokens, [m.model.embed_tokens]), *((b, [b]) for b in m.model.layers.values()),
                 (m.model.norm, [m.model.norm, m.lm_head])]
        ids = {id(p): n for n, p in self.params}
        for unit, holders in units:
            if unit is None:  # not on this pipeline stage
                continue
            buckets = sorted({self.index[ids[id(p)]][1] for h in holders for p in h.parameters() if id(p) in ids})
            unit.register_forward_pre_hook(lambda mod, args, buckets=buckets: self.wait_params(buckets))

    # --------------------------------------------------------------- state, for checkpoints
    def state(self):
        """[(piece, {"master": fp32 tensor, <moment name>: tensor, ...})] and the optimizer's step
        count: the whole of what a checkpoint needs, as plain named tensors and one integer."""
        return [(pc, {"master": m, **self.optimizer.moments(i)}) for i, (pc, m) in enumerate(zip(self.pieces, self.masters))], \
            self.optimizer.steps

    @torch.no_grad()
    def load_state(self, steps, read, kinds=None):
        """read(piece, kind) -> the fp32 tensor of that piece, for "master" and every moment (or only
        the given kinds: a Hugging Face directory holds weights alone), then the model's weights."""
        for pc, named in self.state()[0]:
            for kind, t in named.items():
                if kinds is None or kind in kinds:
                    t.copy_(read(pc, kind))
        self.optimizer.steps = steps
        self.publish()
        self.wait_params()

@torch.no_grad()
def check_replicas(model, grid: Grid):
    """Debug check (nanotron): every replicated tensor is identical on all the ranks that hold it.
    Returns the names that differ (empty list when all is well)."""
    bad = []
    for name, p in model.named_parameters():
        for group in [grid.dp_cp_group] + ([grid.tp_group] if role_of(name, p).tp_dim is None else []):
            if _size(group) > 1:
                ref = p.detach().clone()
                dist.broadcast(ref, src=dist.get_global_rank(group, 0), group=group)
                if not torch.equal(ref, p.detach()):
                    bad.append(name)
    return bad
