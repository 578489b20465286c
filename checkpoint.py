"""Bytes on disk: Hugging Face safetensors in and out, and resharding training checkpoints.

    load_hf(path) -> Apertus          a Hugging Face Apertus directory (config.json + safetensors)
    save_hf(model, path)              the same format back (transformers' from_pretrained loads it)
    save_checkpoint / load_checkpoint training state: each rank writes only what it owns, with the
                                      metadata to place every slice in the full tensor, so a run saved
                                      under one (tp, dp) layout resumes under any other

    python checkpoint.py consolidate RUN_DIR/ckpt-00001000 OUT_DIR   # training checkpoint -> HF, no GPU
"""
import json
import os
import shutil
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model import Apertus, ModelConfig, XIELU, full_shape


class CheckpointError(Exception):
    """A checkpoint or HF directory that cannot be used; the message says which file and why."""


# ----------------------------------------------------------------------------- Hugging Face format
def config_from_hf(hf: dict) -> ModelConfig:
    """config.json -> ModelConfig. RoPE comes in two spellings: top-level rope_theta + rope_scaling
    (transformers 4.x, the released checkpoints) or one rope_parameters dict (transformers 5)."""
    if hf.get("model_type") != "apertus":
        raise CheckpointError(f"config.json has model_type {hf.get('model_type')!r}, expected 'apertus'")
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 12_000_000.0))
    scaling = rope or hf.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "default":
            scaling = None
        elif kind != "llama3":
            raise CheckpointError(f"config.json: unsupported RoPE type {kind!r} (only llama3 or default)")
        else:
            scaling = {"rope_type": "llama3", **{k: float(scaling[k]) for k in (
                "factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor")}}
    try:
        heads = hf["num_attention_heads"]
        return ModelConfig(
            hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, vocab_size=hf["vocab_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 65536), rope_theta=float(theta),
            rope_scaling=scaling, rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            bos_token_id=hf.get("bos_token_id", 1), eos_token_id=hf.get("eos_token_id", 2),
            pad_token_id=hf.get("pad_token_id", 3))
    except KeyError as e:
        raise CheckpointError(f"config.json is missing the field {e.args[0]!r}") from None
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"config.json: {e}") from None


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    # the transformers 4.x spelling of RoPE, which the released checkpoints use and transformers 5 reads
    return {
        "architectures": ["ApertusForCausalLM"], "model_type": "apertus",
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        # spelled out even when off: transformers 5 would otherwise fill in Apertus' llama3 default
        "rope_scaling": cfg.rope_scaling or {"rope_type": "default"}, "rms_norm_eps": cfg.rms_norm_eps,
        "hidden_act": "xielu", "tie_word_embeddings": False, "attention_bias": False,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id, "torch_dtype": str(dtype).removeprefix("torch."),
    }


def read_hf_config(path) -> ModelConfig:
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path) as f:
            return config_from_hf(json.load(f))
    except FileNotFoundError:
        raise CheckpointError(f"{cfg_path}: not found (is {path} a Hugging Face model directory?)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: malformed JSON ({e})") from None


def hf_files(path) -> list[str]:
    """The safetensors files of an HF directory: the ones its index names, or the single file."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return [os.path.join(path, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
    files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors files")
    return files


@torch.no_grad()
def load_hf(path, device="cpu", dtype=torch.float32) -> Apertus:
    """Build the model from a Hugging Face Apertus directory, streaming tensor by tensor: the model is
    allocated once (empty) and each tensor is copied into place as it is read."""
    cfg = read_hf_config(path)
    with torch.device("meta"):
        model = Apertus(cfg)
    model = model.to_empty(device=device).to(dtype)
    for m in model.modules():  # buffers the file may lack (beta, eps): their defined values
        if isinstance(m, XIELU):
            m.reset_parameters()
    expected = dict(model.state_dict(keep_vars=True))
    params = {n for n, _ in model.named_parameters()}
    for file in hf_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq"):
                    continue  # recomputed from the config
                if name not in expected:
                    raise CheckpointError(f"{file}: unexpected tensor {name} (not an Apertus weight)")
                t = f.get_tensor(name)
                if tuple(t.shape) != tuple(expected[name].shape):
                    raise CheckpointError(f"{file}: tensor {name} has shape {tuple(t.shape)}, the config "
                                          f"implies {tuple(expected[name].shape)}")
                expected[name].copy_(t)
                params.discard(name)
    if params:
        raise CheckpointError(f"{path}: missing tensor {sorted(params)[0]}"
                              + (f" and {len(params) - 1} more" if len(params) > 1 else ""))
    return model


def save_hf(model: Apertus, path, dtype=None, max_shard_bytes=5 * 2**30):
    """Write config.json and safetensors that transformers.AutoModelForCausalLM loads."""
    state = model.state_dict()
    dtype = dtype or next(iter(state.values())).dtype
    write_hf(model.config, ((n, t.to(dtype)) for n, t in state.items()), path, dtype, max_shard_bytes)


def write_hf(cfg: ModelConfig, tensors, path, dtype, max_shard_bytes=5 * 2**30):
    """tensors: an iterator of (HF name, tensor), consumed one at a time; at most one shard is held in
    memory. Above max_shard_bytes the weights are split into model-0000i-of-0000n.safetensors + index."""
    os.makedirs(path, exist_ok=True)
    shards, current, size = [], {}, 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(_write_shard(path, len(shards), current))
            current, size = {}, 0
        current[name] = t.detach().contiguous().cpu()
        size += nbytes
    shards.append(_write_shard(path, len(shards), current))
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, total = {}, 0
    for (tmp, keys, nbytes), name in zip(shards, names):
        os.replace(tmp, os.path.join(path, name))
        weight_map.update({k: name for k in keys})
        total += nbytes
    if n > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg, dtype), f, indent=2)


def _write_shard(path, i, tensors):
    tmp = os.path.join(path, f".shard-{i}.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    return tmp, list(tensors), sum(t.numel() * t.element_size() for t in tensors.values())


# ----------------------------------------------------------------------------- training checkpoints
# A checkpoint is a directory ckpt-00001000/ holding meta.json (step, config, layout) and one
# rank-00003.safetensors per rank. Rank files hold what that rank owns under ZeRO-1: for each
# parameter piece, elements [start, end) of the flattened tensor-parallel shard `tp_rank`, as
#     "{kind}|{name}|{tp_rank}|{start}|{end}"   kind = master (fp32 weights) or an optimizer moment
# and the file's metadata says how each shard sits in the full tensor (tp_dim, full and local shape).
# Replicated parameters are written by tp_rank 0 only. The directory is written as ckpt-*.tmp and
# renamed when every rank is done, so a crash during a save never leaves a checkpoint that looks whole.
def _barrier(grid):
    if grid.world > 1:
        torch.distributed.barrier()


def latest_checkpoint(out_dir):
    """The newest complete checkpoint in out_dir, or None (unfinished .tmp directories are ignored)."""
    if not os.path.isdir(out_dir):
        return None
    done = sorted(n for n in os.listdir(out_dir) if n.startswith("ckpt-") and not n.endswith(".tmp")
                  and os.path.exists(os.path.join(out_dir, n, "meta.json")))
    return os.path.join(out_dir, done[-1]) if done else None


def save_checkpoint(out_dir, step, opt, grid, config, optimizer_name, keep=3, data_state=None):
    """Every rank writes what it owns (opt.state(): master pieces and optimizer moments, plain named
    tensors), into ckpt-N.tmp; rank 0 renames it when all are done. data_state: the data loader's
    position (a small JSON-able dict, the same on every rank), kept in meta.json."""
    final = os.path.join(out_dir, f"ckpt-{step:08d}")
    tmp = final + ".tmp"
    if grid.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier(grid)
    pieces, opt_steps = opt.state()
    tensors, layout = {}, {}
    for piece, named in pieces:
        role = opt.roles[piece.name]
        if role.tp_dim is None and grid.tp_rank != 0:
            continue  # replicated over TP: tp_rank 0 writes it
        p = opt.model.get_parameter(piece.name)
        layout[piece.name] = dict(tp_dim=role.tp_dim, tp=grid.tp, local_shape=list(p.shape),
                                  full_shape=list(full_shape(piece.name, p)))
        for kind, value in named.items():
            tensors[f"{kind}|{piece.name}|{grid.tp_rank}|{piece.start}|{piece.end}"] = value
    tensors["rng|torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and grid.device.type == "cuda":
        tensors["rng|cuda"] = torch.cuda.get_rng_state(grid.device)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
              os.path.join(tmp, f"rank-{grid.rank:05d}.safetensors"), metadata={"layout": json.dumps(layout)})
    _barrier(grid)
    if grid.rank == 0:
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(dict(step=step, optimizer=optimizer_name, optimizer_steps=opt_steps, tp=grid.tp, dp=grid.dp,
                           world=grid.world, config=config, data_state=data_state), f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted(n for n in os.listdir(out_dir) if n.startswith("ckpt-") and not n.endswith(".tmp"))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(out_dir, old), ignore_errors=True)
    _barrier(grid)


class ShardedCheckpoint:
    """Reads a training checkpoint under any layout: a piece is taken as written when this layout has
    the same one, else the full tensor is assembled from all the slices that the writers held."""

    def __init__(self, path):
        self.path = path
        try:
            with open(os.path.join(path, "meta.json")) as f:
                self.meta = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable meta.json ({e})") from None
        self.where, self.layout, self.slices = {}, {}, {}
        files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        if len(files) != self.meta["world"]:
            raise CheckpointError(f"{path}: {len(files)} rank files, meta.json says {self.meta['world']}")
        for name in files:
            file = os.path.join(path, name)
            with safe_open(file, framework="pt") as f:
                self.layout.update(json.loads(f.metadata()["layout"]))
                for key in f.keys():
                    self.where[key] = file
                    if not key.startswith("rng|"):
                        kind, pname, tp_rank, s, e = key.split("|")
                        self.slices.setdefault((kind, pname), []).append((int(tp_rank), int(s), int(e), key))
        self._cache = (None, None)

    def read(self, key):
        with safe_open(self.where[key], framework="pt") as f:
            return f.get_tensor(key)

    def kinds(self, name):
        return [k for (k, n) in self.slices if n == name]

    def full(self, kind, name):
        """The whole tensor (fp32), put together from the slices of every writer."""
        if self._cache[0] == (kind, name):
            return self._cache[1]
        if (kind, name) not in self.slices:
            raise CheckpointError(f"{self.path}: no {kind} for parameter {name}")
        lay = self.layout[name]
        full = torch.empty(lay["full_shape"])
        covered = 0
        for r in range(lay["tp"] if lay["tp_dim"] is not None else 1):
            local = torch.empty(lay["local_shape"]).flatten()
            for tp_rank, s, e, key in self.slices[(kind, name)]:
                if tp_rank == r:
                    local[s:e] = self.read(key)
                    covered += e - s
            dim = lay["tp_dim"]
            target = full if dim is None else full.narrow(dim, r * lay["local_shape"][dim], lay["local_shape"][dim])
            target.copy_(local.view(lay["local_shape"]))
        if covered != full.numel():
            raise CheckpointError(f"{self.path}: {kind} of {name} is incomplete ({covered} of {full.numel()} elements)")
        self._cache = ((kind, name), full)
        return full

    def piece(self, kind, name, role, grid, start, end):
        key = f"{kind}|{name}|{grid.tp_rank if role.tp_dim is not None else 0}|{start}|{end}"
        if key in self.where and (role.tp_dim is None or self.layout[name]["tp"] == grid.tp):
            return self.read(key)  # the same layout wrote exactly this piece
        from parallel import tp_slice
        return tp_slice(self.full(kind, name), role, grid).flatten()[start:end]


@torch.no_grad()
def load_checkpoint(path, opt, grid, optimizer_name):
    """Fill the distributed optimizer (master pieces, optimizer moments, its step count) and the model
    from a checkpoint written under any layout. Returns the training step and the data loader's saved
    position (None in a checkpoint without one)."""
    from parallel import tp_slice
    ck = ShardedCheckpoint(path)
    if ck.meta["optimizer"] != optimizer_name:
        raise CheckpointError(f"{path} holds {ck.meta['optimizer']} state, this run uses {optimizer_name}")

    def read(piece, kind):
        role = opt.roles[piece.name]
        return ck.piece(kind, piece.name, role, grid, piece.start, piece.end)
    opt.load_state(ck.meta.get("optimizer_steps", ck.meta["step"]), read)
    if ck.meta["world"] == grid.world:  # RNG streams belong to ranks: only meaningful for the same world
        torch.set_rng_state(_rank_rng(ck, grid.rank, "torch"))
        if grid.device.type == "cuda":
            cuda_state = _rank_rng(ck, grid.rank, "cuda")
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, grid.device)
    return ck.meta["step"], ck.meta.get("data_state")


def _rank_rng(ck, rank, which):
    file = os.path.join(ck.path, f"rank-{rank:05d}.safetensors")
    with safe_open(file, framework="pt") as f:
        return f.get_tensor(f"rng|{which}") if f"rng|{which}" in f.keys() else None


def consolidate(ckpt_path, out_dir, dtype=torch.bfloat16):
    """A training checkpoint (any layout) -> a Hugging Face directory, one tensor at a time, on CPU."""
    ck = ShardedCheckpoint(ckpt_path)
    cfg = ModelConfig(**ck.meta["config"]["model"])
    with torch.device("meta"):
        names = list(Apertus(cfg).state_dict())
    defaults = XIELU()  # beta and eps are fixed buffers, not trained

    def tensors():
        for name in names:
            if name.endswith(("act_fn.beta", "act_fn.eps")):
                yield name, getattr(defaults, name.rsplit(".", 1)[1]).to(dtype)
            else:
                yield name, ck.full("master", name).to(dtype)
    write_hf(cfg, tensors(), out_dir, dtype)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "consolidate":
        sys.exit("usage: python checkpoint.py consolidate CHECKPOINT_DIR HF_OUT_DIR")
    try:
        consolidate(sys.argv[2], sys.argv[3])
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {sys.argv[3]}")
