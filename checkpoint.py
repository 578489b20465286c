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

from model import Apertus, ModelConfig, XIELU, rope_inv_freq


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
    model.inv_freq.copy_(rope_inv_freq(cfg))
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
