"""The Apertus model (swiss-ai/Apertus-8B, -70B) in one readable file.

Decoder-only, pre-norm, no biases:
    h   = x + o_proj(attn(attention_layernorm(x)))
    out = h + down_proj(xielu(up_proj(feedforward_layernorm(h))))
with GQA, an RMSNorm over head_dim on q and k (QK-norm) BEFORE RoPE, llama3-scaled RoPE in the
rotate_half convention, a non-gated MLP with the xIELU activation, a final norm and an untied head.
Module and parameter names are the Hugging Face ones, so `model.state_dict()` has exactly the keys of
the released safetensors (model.layers.{i}.self_attn.q_proj.weight, ...).

The model knows nothing of parallelism: every shape that tensor parallelism changes is read off the
weights (`view(B, T, -1, head_dim)`), so parallel.py can swap nn.Linear for its column/row-parallel
versions and the same forward runs on a shard. Audit an architecture without allocating it:

    python model.py configs/apertus-70b.toml
"""
import math
import sys
import zlib
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # FlexAttention: the fast document-masked attention on CUDA (torch >= 2.5)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover
    create_block_mask = flex_attention = None


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
    rope_scaling: dict | None = field(default_factory=lambda: dict(
        rope_type="llama3", factor=8.0, original_max_position_embeddings=8192,
        low_freq_factor=1.0, high_freq_factor=4.0))  # None = plain RoPE
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
            raise ValueError(f"GQA cannot split {self.num_attention_heads} query heads into "
                             f"{self.num_key_value_heads} KV groups: num_attention_heads must be a "
                             f"multiple of num_key_value_heads")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type", "llama3") != "llama3":
            raise ValueError(f"unsupported rope_scaling {self.rope_scaling}: only llama3 (or none)")


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # in fp32, cast back to the input dtype, THEN multiply by the weight (as the reference does)
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class XIELU(nn.Module):
    """xIELU (arXiv 2411.13010): learnable per-layer alpha_p / alpha_n, stored raw (before softplus)."""
    def __init__(self, alpha_p_init=0.8, alpha_n_init=0.8, beta=0.5, eps=-1e-6):
        super().__init__()
        self.alpha_p = nn.Parameter(torch.empty(1))
        self.alpha_n = nn.Parameter(torch.empty(1))
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
    """[head_dim/2] inverse frequencies, with llama3 scaling (APERTUS.md section 1)."""
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


def document_ids(input_ids, eos_id):
    """[B, T] -> doc_ids [B, T]. A document starts after every EOS (Megatron's --reset-attention-mask),
    so a sequence that starts mid-document treats its head as a document of its own."""
    is_eos = (input_ids == eos_id).int()
    return is_eos.cumsum(-1) - is_eos  # the EOS itself still belongs to its document


def document_positions(doc_ids):
    """[B, T] -> position ids [B, T] that restart at 0 at every document start (--reset-position-ids)."""
    arange = torch.arange(doc_ids.shape[-1], device=doc_ids.device).expand_as(doc_ids)
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return arange - torch.where(start, arange, torch.zeros_like(arange)).cummax(-1).values


_compiled_flex = None


def attention(q, k, v, doc_ids=None, backend="sdpa", block_mask=None):
    """q [B, Hq, T, D], k/v [B, Hkv, T, D] -> [B, Hq, T, D]. Causal; with doc_ids [B, T] also never
    across a document boundary. KV head j serves query heads j*G .. j*G+G-1 (G = Hq/Hkv), as in HF."""
    if backend == "flex":
        global _compiled_flex
        if _compiled_flex is None:  # compiled once, on first use; eager flex is a slow reference
            _compiled_flex = torch.compile(flex_attention) if q.is_cuda else flex_attention
        return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=True)
    if doc_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    T = q.shape[2]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    mask = causal & (doc_ids[:, :, None] == doc_ids[:, None, :])  # [B, T, T]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)


def flex_block_mask(doc_ids, B, T, device):
    if doc_ids is None:
        mask_mod = lambda b, h, q, kv: q >= kv
    else:
        mask_mod = lambda b, h, q, kv: (q >= kv) & (doc_ids[b, q] == doc_ids[b, kv])
    return create_block_mask(mask_mod, B if doc_ids is not None else None, None, T, T, device=device)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, D = cfg.hidden_size, cfg.head_dim
        self.head_dim = D
        self.q_proj = nn.Linear(d, cfg.num_attention_heads * D, bias=False)
        self.k_proj = nn.Linear(d, cfg.num_key_value_heads * D, bias=False)
        self.v_proj = nn.Linear(d, cfg.num_key_value_heads * D, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * D, d, bias=False)
        self.q_norm = RMSNorm(D, cfg.rms_norm_eps)  # one [D] weight shared by all heads
        self.k_norm = RMSNorm(D, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, doc_ids, backend, block_mask):
        B, T = x.shape[0], cos.shape[1]  # T: the full sequence (x may be a sequence-parallel shard)
        q = self.q_norm(self.q_proj(x).view(B, T, -1, self.head_dim))  # [B, T, Hq(/tp), D]
        k = self.k_norm(self.k_proj(x).view(B, T, -1, self.head_dim))  # [B, T, Hkv(/tp), D]
        v = self.v_proj(x).view(B, T, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)         # QK-norm first, then RoPE
        y = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), doc_ids, backend, block_mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.act_fn = XIELU()
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(self.act_fn(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, doc_ids=None, backend="sdpa", block_mask=None):
        h = x + self.self_attn(self.attention_layernorm(x), cos, sin, doc_ids, backend, block_mask)
        return h + self.mlp(self.feedforward_layernorm(h))


class Decoder(nn.Module):  # "model." in the HF keys
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def cross_entropy(logits, targets, loss_mask):
    """Per-token loss [B, T] in fp32, zero where loss_mask is False. parallel.py swaps in a
    vocab-parallel version that never gathers the full logits."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return loss.view(targets.shape) * loss_mask


class Apertus(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.inv_freq = rope_inv_freq(cfg)  # a plain tensor, not a buffer: .to(bfloat16) must not round it
        self.loss_fn = cross_entropy
        self.attn_backend = "sdpa"  # "flex" on CUDA (train.py), "sdpa" with an explicit mask on CPU
        self.activation_checkpointing = False

    def forward(self, input_ids, targets=None, loss_mask=None, doc_ids=None, reduction="mean"):
        """input_ids [B, T] -> logits [B, T, V] (V/tp under tensor parallelism); with targets, the loss:
        the mean (or sum) over the tokens that count (loss_mask True and target != -100).
        doc_ids [B, T] (see document_ids) masks attention per document and restarts positions."""
        B, T = input_ids.shape
        if doc_ids is not None and bool((doc_ids[:, -1] == doc_ids[:, 0]).all()):
            doc_ids = None  # no document boundary in this batch: the plain causal path
        if doc_ids is None:
            pos = torch.arange(T, device=input_ids.device).expand(B, T)
        else:
            pos = document_positions(doc_ids)
        x = self.model.embed_tokens(input_ids)
        if self.inv_freq.device != x.device:
            self.inv_freq = self.inv_freq.to(x.device)
        cos, sin = rope_cos_sin(self.inv_freq, pos, x.dtype)
        block_mask = None
        if self.attn_backend == "flex":
            block_mask = flex_block_mask(doc_ids, B, T, input_ids.device)
        for block in self.model.layers:
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, doc_ids, self.attn_backend,
                                                      block_mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, doc_ids, self.attn_backend, block_mask)
        logits = self.lm_head(self.model.norm(x))
        if targets is None:
            return logits
        mask = targets != -100 if loss_mask is None else loss_mask & (targets != -100)
        loss = self.loss_fn(logits, targets.clamp(min=0), mask).sum()
        return loss / mask.sum().clamp(min=1) if reduction == "mean" else loss

    @torch.no_grad()
    def init_weights(self, seed=0, param_slices=None):
        """Apertus pretraining init, deterministic from seed. Each full tensor is drawn from its own
        generator (seeded by seed and the tensor's name) and then sliced, so every parallel layout
        starts from the same numbers: param_slices(name, full_tensor) -> this rank's shard."""
        std, L = self.config.init_std, self.config.num_hidden_layers
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            if name.endswith(("act_fn.alpha_p", "act_fn.alpha_n")):
                continue
            shape = full_shape(self, name) if param_slices else p.shape
            g = torch.Generator(p.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            s = std / math.sqrt(2 * L) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            full = torch.randn(shape, generator=g, device=p.device, dtype=torch.float32) * s
            p.copy_(param_slices(name, full) if param_slices else full)
        for m in self.modules():
            if isinstance(m, XIELU):
                m.reset_parameters()

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Sample max_new_tokens after idx [B, T] (no KV cache: simple, and fine for a demo)."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.max_position_embeddings:])[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1)
            idx = torch.cat((idx, nxt), dim=1)
        return idx


def full_shape(model, name):
    """The unsharded shape of a parameter (parallel layers record it as `full_shape`)."""
    mod = model.get_submodule(name.rsplit(".", 1)[0])
    return getattr(mod, "full_shape", None) or model.get_parameter(name).shape


# ----------------------------------------------------------------------------- the audit
def param_count(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Apertus(cfg).parameters())


def flops_per_token(cfg: ModelConfig, seq_len: int, n_params: int | None = None) -> float:
    """Training FLOPs per token: 6N for the matmuls (forward + backward), plus causal attention:
    QK^T and AV cost 12*L*H*D*T forward + backward for full attention, half of that when causal."""
    n = n_params if n_params is not None else param_count(cfg)
    return 6 * n + 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len


def audit(cfg: ModelConfig, seq_len: int = 4096) -> str:
    """Parameter count, breakdown, FLOPs per token and size, from a model built on the meta device."""
    with torch.device("meta"):
        m = Apertus(cfg)
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
              f"training FLOPs/token at seq_len {seq_len}: {flops:.4g} = 6N + 6 x L x H x D x T "
              f"(dense matmuls fwd+bwd, plus causal attention: half of the 12LHDT of full attention)",
              f"bf16 weights: {2 * total / 1e9:.2f} GB ({2 * total / 2**30:.2f} GiB)"]
    return "\n".join(lines)


def config_from_dict(d: dict, section="model") -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    for k in d:
        if k not in known:
            raise ValueError(f"unknown key {section}.{k} (known: {', '.join(sorted(known))})")
    return ModelConfig(**d)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python model.py CONFIG.toml")
    import tomllib
    try:
        with open(sys.argv[1], "rb") as f:
            cfg = config_from_dict(tomllib.load(f).get("model", {}))
    except (OSError, ValueError, TypeError, tomllib.TOMLDecodeError) as e:
        sys.exit(f"error: {e}")
    print(audit(cfg))
