"""The Apertus model (swiss-ai/Apertus-8B-2509, -70B-2509) in one readable file.

Decoder-only, pre-norm, no biases:
    h   = x + o_proj(attn(attention_layernorm(x)))
    out = h + down_proj(xielu(up_proj(feedforward_layernorm(h))))
with GQA, an RMSNorm over head_dim on q and k (QK-norm) BEFORE RoPE, llama3-scaled RoPE in the rotate_half convention,
a non-gated MLP with the xIELU activation, a final norm and an untied head. Sources: the Apertus tech report
(arXiv 2509.14233, section 2), transformers' models/apertus/modeling_apertus.py (the reference the tests compare
against), xIELU (arXiv 2411.13010) and Llama 3's RoPE scaling (transformers' _compute_llama3_parameters). Module and
parameter names are the Hugging Face ones: `model.state_dict()` has exactly the keys of the released safetensors.

Every parameter carries a Role stamped where it is made (Megatron-LM's habit): init, parallel.py, the
optimizer groups and the checkpoints read the role, never the name. The model knows nothing of
parallelism: every shape that tensor parallelism changes is read off the weights (`view(B, T, -1, D)`), so
parallel.py can swap nn.Linear for its column/row-parallel versions and the same forward runs on a slice.
`python plan.py CONFIG --audit` counts an architecture's parameters without allocating it.
"""
import math
import zlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# FlexAttention: the fast document-masked attention on CUDA (torch >= 2.5)
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

@dataclass
class ModelConfig:
    """The [model] section of a config file. Defaults are Apertus-8B."""
    hidden_size: int = 4096              # d, the residual stream width
    intermediate_size: int = 21504       # MLP width (not gated)
    num_hidden_layers: int = 32
    num_attention_heads: int = 32        # query heads
    num_key_value_heads: int = 8         # KV heads (GQA); must divide num_attention_heads
    head_dim: int = 128
    vocab_size: int = 131072
    max_position_embeddings: int = 65536
    rope_theta: float = 12_000_000.0     # 500,000 during the 4k pretraining
    rope_scaling: dict | None = field(default_factory=lambda: dict(rope_type="llama3", factor=8.0,
        original_max_position_embeddings=8192, low_freq_factor=1.0, high_freq_factor=4.0))  # None = plain RoPE
    rms_norm_eps: float = 1e-5
    init_std: float = 0.008944           # N(0, std) for every linear and the embedding
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 3

    def __post_init__(self):
        if self.rope_scaling is False:  # TOML has no null: `rope_scaling = false` means plain RoPE
            self.rope_scaling = None
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"GQA cannot split {self.num_attention_heads} query heads into {self.num_key_value_heads} "
                             f"KV groups: num_attention_heads must be a multiple of num_key_value_heads")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type", "llama3") != "llama3":
            raise ValueError(f"unsupported rope_scaling {self.rope_scaling}: only llama3 (or none)")

@dataclass(frozen=True)
class Role:
    """What a parameter is, declared where it is made; every consumer reads this, never the name.

    init              "normal" N(0, init_std) | "output" N(0, init_std / sqrt(2L)) (o_proj, down_proj)
                      | "ones" (norms) | "xielu" (the activation's own constants)
    weight_decay      decayed by the optimizer (matrices yes; norms and xIELU scalars no)
    tp_dim            the dimension tensor parallelism splits it along; None = whole on every TP rank
    full_shape        the unsplit shape (None = the parameter's own shape)
    tp_partial_grad   whole on every TP rank, but each rank sees only part of its gradient (QK-norm
                      weights act on this rank's heads, xIELU scalars on its MLP features): summed over TP
    sequence_parallel runs on sequence slices under sequence parallelism (the block and final norms):
                      its gradient is summed over TP when sequence parallelism is on
    """
    init: str
    weight_decay: bool
    tp_dim: int | None = None
    full_shape: tuple | None = None
    tp_partial_grad: bool = False
    sequence_parallel: bool = False

def stamp(p: nn.Parameter, role: Role) -> nn.Parameter:
    p.role = role
    return p

def role_of(name: str, p: torch.Tensor) -> Role:
    if not isinstance(getattr(p, "role", None), Role):
        raise RuntimeError(f"parameter {name} has no Role: stamp one where it is made (model.stamp)")
    return p.role

def full_shape(name: str, p: torch.Tensor) -> tuple:
    """The unsplit shape of a parameter (tensor-parallel layers record it in the role)."""
    return tuple(role_of(name, p).full_shape or p.shape)

def linear(d_in, d_out, init="normal"):
    lin = nn.Linear(d_in, d_out, bias=False)
    stamp(lin.weight, Role(init, weight_decay=True))
    return lin

class RMSNorm(nn.Module):
    def __init__(self, dim, eps, **role):
        super().__init__()
        self.weight = stamp(nn.Parameter(torch.ones(dim)), Role("ones", weight_decay=False, **role))
        self.eps = eps

    def forward(self, x):
        # in fp32, cast back to the input dtype, THEN multiply by the weight (as the reference does)
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

class XIELU(nn.Module):
    """xIELU (arXiv 2411.13010): learnable per-layer alpha_p / alpha_n, stored raw (before softplus)."""
    def __init__(self, alpha_p_init=0.8, alpha_n_init=0.8, beta=0.5, eps=-1e-6):
        super().__init__()
        scalar = Role("xielu", weight_decay=False, tp_partial_grad=True)
        self.alpha_p = stamp(nn.Parameter(torch.empty(1)), scalar)
        self.alpha_n = stamp(nn.Parameter(torch.empty(1)), scalar)
        self.register_buffer("beta", torch.tensor(beta))  # 0-dim buffers: the HF checkpoints hold them
        self.register_buffer("eps", torch.tensor(eps))
        self.inits = (alpha_p_init, alpha_n_init, beta, eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        ap, an, beta, eps = self.inits
        self.alpha_p.fill_(math.log(math.expm1(ap)))          # softplus^-1(0.8)
        self.alpha_n.fill_(math.log(math.expm1(an - beta)))   # beta + softplus(alpha_n) = 0.8
        self.beta.fill_(beta)
        self.eps.fill_(eps)

    def forward(self, x):
        ap = F.softplus(self.alpha_p)
        an = self.beta + F.softplus(self.alpha_n)
        return torch.where(x > 0, ap * x * x + self.beta * x,
                           (torch.expm1(torch.minimum(x, self.eps)) - x) * an + self.beta * x)

def rope_inv_freq(cfg: ModelConfig, theta: float | None = None) -> torch.Tensor:
    """[head_dim/2] inverse frequencies, with Llama 3's scaling: long wavelengths slowed by `factor`,
    short ones kept, the band in between interpolated (transformers' _compute_llama3_parameters)."""
    D = cfg.head_dim
    inv = 1.0 / ((theta or cfg.rope_theta) ** (torch.arange(0, D, 2, device="cpu").float() / D))
    s = cfg.rope_scaling
    if s is None:
        return inv
    factor, old_len = s["factor"], s["original_max_position_embeddings"]
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)      # long waves: slowed by factor
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled            # in between: interpolated
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)

def rope_cos_sin(inv_freq, position_ids, dtype):
    """position_ids [B, T] -> cos, sin [B, T, 1, D] (frequencies concatenated twice: rotate_half)."""
    freqs = position_ids[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)

def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin

def document_ids(input_ids, eos_id, bos_id=None):
    """[B, T] -> doc_ids [B, T]. A document starts after every EOS (Megatron's --reset-attention-mask)
    and, given bos_id, at every BOS too (chat data has <s> but no </s> between conversations); a
    sequence that starts mid-document treats its head as a document of its own."""
    start = torch.zeros_like(input_ids, dtype=torch.int32)
    start[:, 1:] = input_ids[:, :-1] == eos_id   # the EOS itself still belongs to its document
    if bos_id is not None:
        start[:, 1:] |= input_ids[:, 1:] == bos_id
    return start.cumsum(-1, dtype=torch.int32)

def document_positions(doc_ids):
    """[B, T] -> position ids [B, T] that restart at 0 at every document start (--reset-position-ids)."""
    arange = torch.arange(doc_ids.shape[-1], device=doc_ids.device).expand_as(doc_ids)
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return arange - torch.where(start, arange, torch.zeros_like(arange)).cummax(-1).values

# ----------------------------------------------------------------------------- attention
FLEX_KERNEL_OPTIONS = None  # FlexAttention's kernel_options (block sizes, warps); None = its defaults

class compiled_on_first_use:
    """fn, torch.compile'd the first time it is called: importing this module stays fast (torch.compile
    imports the whole compiler stack) and CPU-only runs never pay for it."""
    def __init__(self, fn):
        self.fn, self.compiled = fn, None

    def __call__(self, *args, **kwargs):
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=False)
        return self.compiled(*args, **kwargs)

# Eager code calls the compiled kernel (eager flex_attention is a slow reference); inside a compiled
# block flex_attention itself is traced into the block's graph.
_flex_compiled = compiled_on_first_use(flex_attention)

def _block_mask(doc_ids, q_pos=None):
    B, T = doc_ids.shape

    def causal_same_document(b, h, q, kv):
        if q_pos is not None:  # context parallelism: local query q is the sequence's token q_pos[q]
            q = q_pos[q]
        return (q >= kv) & (doc_ids[b, q] == doc_ids[b, kv])
    Q = T if q_pos is None else len(q_pos)
    return create_block_mask(causal_same_document, B, None, Q, T, device=doc_ids.device)

# compiled as a whole, so the mask function made at each call is traced, not guarded on: one graph,
# no recompiles, no host sync
_block_mask_compiled = compiled_on_first_use(_block_mask)

def make_block_mask(doc_ids, q_pos=None):
    """The FlexAttention block mask of a micro-batch: causal, and never across a document boundary. q_pos [Tq]: only
    these queries (positions in the sequence), against every key (context parallelism)."""
    return (_block_mask_compiled if doc_ids.is_cuda else _block_mask)(doc_ids, q_pos)

def sdpa_mask(doc_ids, q_pos=None):
    """The same mask for scaled_dot_product_attention, [B, 1, Tq, T] bool; None when no micro-batch
    row has a document boundary (plain causal is faster; the check syncs with the host, fine on CPU)."""
    if q_pos is None and bool((doc_ids[:, -1] == doc_ids[:, 0]).all()):
        return None
    q = torch.arange(doc_ids.shape[1], device=doc_ids.device) if q_pos is None else q_pos
    causal = q[:, None] >= torch.arange(doc_ids.shape[1], device=doc_ids.device)
    return (causal & (doc_ids[:, q, None] == doc_ids[:, None, :]))[:, None]

def attention(q, k, v, mask=None):
    """q [B, Hq, T, D], k/v [B, Hkv, T, D] -> [B, Hq, T, D], causal. mask: a BlockMask (FlexAttention), a [B, 1, T, T]
    bool mask (SDPA) or None (plain causal). KV head j serves query heads j*G .. j*G+G-1 (G = Hq/Hkv), as in HF."""
    if isinstance(mask, BlockMask):
        flex = flex_attention if torch.compiler.is_compiling() or not q.is_cuda else _flex_compiled
        return flex(q, k, v, block_mask=mask, enable_gqa=True, kernel_options=FLEX_KERNEL_OPTIONS)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)

class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, D = cfg.hidden_size, cfg.head_dim
        self.head_dim = D
        self.q_proj = linear(d, cfg.num_attention_heads * D)
        self.k_proj = linear(d, cfg.num_key_value_heads * D)
        self.v_proj = linear(d, cfg.num_key_value_heads * D)
        self.o_proj = linear(cfg.num_attention_heads * D, d, init="output")
        # one [D] weight shared by all heads; each TP rank holds some heads, so its gradient is partial
        self.q_norm = RMSNorm(D, cfg.rms_norm_eps, tp_partial_grad=True)
        self.k_norm = RMSNorm(D, cfg.rms_norm_eps, tp_partial_grad=True)
        self.gather_kv = None  # context parallelism: parallel.py sets the all-gather of every rank's K and V

    def forward(self, x, cos, sin, mask, cache=None):
        B, T = x.shape[0], cos.shape[1]  # T: the full sequence (x may be a sequence-parallel slice)
        q = self.q_norm(self.q_proj(x).view(B, T, -1, self.head_dim))  # [B, T, Hq(/tp), D]
        k = self.k_norm(self.k_proj(x).view(B, T, -1, self.head_dim))  # [B, T, Hkv(/tp), D]
        v = self.v_proj(x).view(B, T, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)         # QK-norm first, then RoPE
        if self.gather_kv is not None:  # T = this rank's tokens; K and V: [B, T x cp, Hkv(/tp), D]
            k, v = self.gather_kv(k, v)
        if cache is not None:  # generation: the keys and values of the earlier positions, [B, S + T, Hkv, D]
            k = cache["k"] = torch.cat((cache.get("k", k[:, :0]), k), 1)
            v = cache["v"] = torch.cat((cache.get("v", v[:, :0]), v), 1)
        y = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size)
        self.act_fn = XIELU()
        self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size, init="output")

    def forward(self, x):
        return self.down_proj(self.act_fn(self.up_proj(x)))

class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, sequence_parallel=True)
        self.self_attn = Attention(cfg)
        self.feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, sequence_parallel=True)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None):
        h = x + self.self_attn(self.attention_layernorm(x), cos, sin, mask, cache)
        return h + self.mlp(self.feedforward_layernorm(h))

class Decoder(nn.Module):  # "model." in the HF keys
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        stamp(self.embed_tokens.weight, Role("normal", weight_decay=True))
        # a dict keyed by the layer index: a pipeline stage keeps only its own layers, under their
        # global names (model.layers.17...), so checkpoints do not depend on the layout
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.num_hidden_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, sequence_parallel=True)

# ----------------------------------------------------------------------------- the loss
# logits held at once: on CPU memory is what counts (64 tokens x 131,072 ids, 32 MB in fp32); on a
# GPU the chunk must be large enough that the fp32 accumulation of the head's weight gradient, a
# [V, d] read and write per chunk, stays small next to the chunk's GEMMs (2,048 tokens at 131,072 ids)
LOSS_CHUNK_ELEMENTS = {"cpu": 2**23, "cuda": 2**28}

def _accumulate_mm(acc, a, b):
    """acc += a @ b with acc in fp32: bf16 inputs on CUDA accumulate straight into fp32 (one GEMM)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    try:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    except (RuntimeError, NotImplementedError, TypeError):  # a torch or device without mixed-dtype addmm
        acc.add_(a @ b)

# The three passes over one chunk of logits [C, Vl], split where vocab-parallel ranks must all-reduce.
# Compiled on CUDA (each becomes one fused kernel that reads the bf16 logits once); eager elsewhere.
def _ce_max(logits):                                          # -> [C] row max
    return logits.amax(-1).to(torch.promote_types(logits.dtype, torch.float32))

def _ce_sum_exp(logits, mx, local, inside):                   # -> sum of exp, target logit (shifted)
    x = logits.to(mx.dtype)
    target = (x.gather(1, local[:, None])[:, 0] - mx) * inside
    return (x - mx[:, None]).exp_().sum(-1), target

def _ce_grad(logits, mx, sum_exp, local, inside, m):          # -> (softmax - onehot) * mask, [C, Vl]
    p = (logits.to(mx.dtype) - mx[:, None]).exp_().div_(sum_exp[:, None])  # the one new [C, Vl] tensor
    if torch.compiler.is_compiling():  # the target as a comparison: Inductor fuses it all into one pass
        hit = (torch.arange(logits.shape[1], device=logits.device) == local[:, None]) & inside[:, None]
        p = p - hit.to(p.dtype)
    else:  # eager: in place, no more [C, Vl] temporaries
        p[torch.arange(len(local), device=p.device), local] -= inside.to(p.dtype)
    return p.mul_(m[:, None]).to(logits.dtype)

_CE_COMPILED = {f: compiled_on_first_use(f) for f in (_ce_max, _ce_sum_exp, _ce_grad)}

class LMHeadLoss(torch.autograd.Function):
    """sum_i mask_i * cross_entropy(h_i @ W^T, target_i), a chunk of tokens at a time, so the [N, V] logits never exist,
    forward or backward (Liger-Kernel's fused linear cross-entropy). The output is a scalar, so the gradients are
    computed in the forward, chunk by chunk, and backward only scales them. W may be a vocabulary slice [V/tp, d]
    starting at id vocab_start: then all_reduce (given by parallel.py) combines the max, the target logit and the
    sum of exp over the TP ranks (Megatron's vocab-parallel cross-entropy)."""
    @staticmethod
    def forward(ctx, h, weight, targets, mask, need_grad, chunk, vocab_start, all_reduce, compiled):
        # h [N, d], weight [Vl, d], targets [N] (global ids), mask [N] bool
        N, Vl = h.shape[0], weight.shape[0]
        acc = torch.promote_types(h.dtype, torch.float32)  # fp32 for bf16 weights (fp64 in tests)
        f_max, f_sum, f_grad = (_CE_COMPILED[f] if compiled else f for f in (_ce_max, _ce_sum_exp, _ce_grad))
        total = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty(h.shape, dtype=acc, device=h.device) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_grad else None
        for s in range(0, N, chunk):
            hc, m = h[s:s + chunk], mask[s:s + chunk].to(acc)
            logits = hc @ weight.t()                                         # [C, Vl], h's dtype
            local = targets[s:s + chunk] - vocab_start
            inside = (local >= 0) & (local < Vl)
            local = local.masked_fill(~inside, 0)
            mx = f_max(logits)
            all_reduce(mx, "max")
            sum_exp, target = f_sum(logits, mx, local, inside)
            all_reduce(sum_exp, "sum")
            all_reduce(target, "sum")
            total += ((sum_exp.log() - target) * m).sum()
            if need_grad:  # d loss / d logits = softmax - onehot(target), masked
                g = f_grad(logits, mx, sum_exp, local, inside, m)
                del logits
                grad_h[s:s + chunk] = g @ weight
                _accumulate_mm(grad_w, g.t(), hc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype, ctx.h_dtype = weight.dtype, h.dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        grad_h, grad_w = ctx.saved_tensors  # scaled in fp32, then rounded once to the weights' dtype
        return (grad_h * grad).to(ctx.h_dtype), grad_w.mul_(grad).to(ctx.weight_dtype), *[None] * 7

def loss_chunk_rows(vocab_slice, device_type):
    """Rows of logits [rows, vocab_slice] the loss holds at once on this device type (at least one)."""
    elements = LOSS_CHUNK_ELEMENTS if isinstance(LOSS_CHUNK_ELEMENTS, int) else LOSS_CHUNK_ELEMENTS[device_type]
    return max(1, elements // vocab_slice)

def lm_head_loss(h, head, targets, mask, vocab_start=0, all_reduce=lambda x, op: x, compiled=False):
    """h [B, T, d] -> the summed loss over the tokens where mask is True (fp32 scalar)."""
    d, Vl = h.shape[-1], head.weight.shape[0]
    chunk = loss_chunk_rows(Vl, "cuda" if h.is_cuda else "cpu")
    need_grad = torch.is_grad_enabled() and (h.requires_grad or head.weight.requires_grad)
    return LMHeadLoss.apply(h.reshape(-1, d), head.weight, targets.reshape(-1), mask.reshape(-1),
                            need_grad, chunk, vocab_start, all_reduce, compiled and h.is_cuda)

class Apertus(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = linear(cfg.hidden_size, cfg.vocab_size)
        self.inv_freq = rope_inv_freq(cfg)  # a plain tensor, not a buffer: .to(bfloat16) must not round it
        self.loss_fn = lm_head_loss
        self.attn_backend = "sdpa"  # "flex" on CUDA (train.py), "sdpa" with an explicit mask on CPU
        self.activation_checkpointing = False
        self.compiled = False  # compile_blocks() sets it: the loss's chunk passes are compiled too

    def _apply(self, fn, recurse=True):
        # .to(), .cuda() and .to_empty() may replace the Parameter objects: carry the roles over
        roles = {n: p.role for n, p in self.named_parameters() if hasattr(p, "role")}
        super()._apply(fn, recurse)
        for n, p in self.named_parameters():
            if n in roles:
                p.role = roles[n]
        return self

    def forward(self, input_ids, targets=None, loss_mask=None, doc_ids=None, reduction="mean", hidden=None,
                cp_index=None, chunk=None, cache=None):
        """input_ids [B, T] -> logits [B, T, V/tp]; with targets, the loss: the mean (or "sum", or each row's sum
        [B]: "sequence") over the tokens that count (loss_mask True and target != -100). doc_ids [B, T] (document_ids)
        masks attention per document and restarts positions. cache: the keys and values the input continues (generation:
        the last logits only). A pipeline stage (parallel.keep_stage) without the embedding takes the previous stage's
        output as `hidden`; one without the head returns its output; chunk (c, V) runs only the c-th of V equal runs of
        its layers (interleaved schedule). cp_index [T/cp] (parallel.cp_positions): positions and the mask come from the
        whole sequence, then only these tokens run (context parallelism)."""
        doc = torch.zeros_like(input_ids) if doc_ids is None else doc_ids
        S, T = 0 if cache is None else cache.setdefault("length", 0), input_ids.shape[1]  # S: positions in the cache
        pos = document_positions(doc) + S
        if cache is not None:  # causal, aligned at the end: query i sees the S cached keys and the new ones <= i
            mask, cache["length"] = torch.ones(T, S + T, dtype=torch.bool, device=doc.device).tril(S), S + T
        else:  # built once here, shared by every layer
            mask = make_block_mask(doc, cp_index) if self.attn_backend == "flex" else sdpa_mask(doc, cp_index)
        if cp_index is not None:  # this rank's tokens from here on
            input_ids, pos = input_ids[:, cp_index], pos[:, cp_index]
            targets, loss_mask = (t if t is None else t[:, cp_index] for t in (targets, loss_mask))
        x = self.model.embed_tokens(input_ids) if hidden is None else hidden
        self.inv_freq = self.inv_freq.to(x.device)  # no copy when already there
        cos, sin = rope_cos_sin(self.inv_freq, pos, x.dtype)
        blocks = list(self.model.layers.items())
        c, V = chunk or (0, 1)
        for name, block in blocks[c * len(blocks) // V:(c + 1) * len(blocks) // V]:
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, None if cache is None else cache.setdefault(name, {}))
        if self.lm_head is None or c < V - 1:
            return x
        h = self.model.norm(x)
        if targets is None:
            return self.lm_head(h if cache is None else h[:, -1:])
        counted = targets != -100 if loss_mask is None else loss_mask & (targets != -100)
        if reduction == "sequence":  # [B], row by row: minus each row's log-probability of its counted targets
            return torch.stack([self.loss_fn(h[i:i + 1], self.lm_head, targets[i:i + 1].clamp(min=0), counted[i:i + 1],
                                             compiled=self.compiled) for i in range(len(h))])
        loss = self.loss_fn(h, self.lm_head, targets.clamp(min=0), counted, compiled=self.compiled)
        return loss / counted.sum().clamp(min=1) if reduction == "mean" else loss

    @torch.no_grad()
    def init_weights(self, seed=0, tp_slice=None):
        """Apertus pretraining init (report section 2.4: N(0, 0.008944), output projections scaled by
        1/sqrt(2L)), deterministic from seed. Each full tensor is drawn from its own generator (seeded by
        seed and the tensor's name) and then sliced, so every parallel layout starts from the same
        numbers: tp_slice(role, full_tensor) -> this rank's slice."""
        std, L = self.config.init_std, self.config.num_hidden_layers
        for name, p in self.named_parameters():
            role = role_of(name, p)
            if role.init == "ones":
                p.fill_(1.0)
            elif role.init in ("normal", "output"):
                g = torch.Generator(p.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                s = std / math.sqrt(2 * L) if role.init == "output" else std
                full = torch.randn(full_shape(name, p), generator=g, device=p.device, dtype=torch.float32) * s
                p.copy_(tp_slice(role, full) if tp_slice else full)
            elif role.init != "xielu":
                raise ValueError(f"{name}: unknown init {role.init!r}")
        for m in self.modules():
            if isinstance(m, XIELU):
                m.reset_parameters()

    def compile_blocks(self):
        """torch.compile each block's forward in place (the blocks repeat, so compilation stays short).
        The modules stay where they are, so every parameter keeps its name (no `_orig_mod.` in
        state_dict or checkpoints), and hooks on a block run outside its compiled graph."""
        for block in self.model.layers.values():
            block.forward = torch.compile(block.forward, dynamic=False)
        self.compiled = True

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, cache=True):
        """Sample max_new_tokens after idx [B, T] (temperature 0: greedy; cache=False: no KV cache, the reference)."""
        kv = {"length": 0} if cache else None
        for _ in range(max_new_tokens):
            x = idx[:, kv["length"]:] if cache else idx[:, -self.config.max_position_embeddings:]
            idx = torch.cat((idx, next_token(self(x, cache=kv)[:, -1, :].float(), temperature, top_k)), dim=1)
        return idx

def next_token(logits, temperature=1.0, top_k=None):
    """logits [B, V] -> the next token [B, 1]: the most likely at temperature 0, else drawn from the top_k
    (None or 0: from the whole vocabulary) at this temperature."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    return torch.multinomial(F.softmax(logits, dim=-1), 1)

# ----------------------------------------------------------------------------- counts
def param_count(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Apertus(cfg).parameters())

def flops_per_token(cfg: ModelConfig, seq_len: int, n_params: int | None = None) -> float:
    """Training FLOPs per token: 6N for the matmuls (forward + backward) where N leaves out the input
    embedding (a lookup, not a matmul), plus causal attention: QK^T and AV cost 12*L*H*D*T forward +
    backward for full attention, half of that when causal."""
    n = n_params if n_params is not None else param_count(cfg)
    n_matmul = n - cfg.vocab_size * cfg.hidden_size
    return 6 * n_matmul + 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len
