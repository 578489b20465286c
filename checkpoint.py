"""Bytes on disk, in two halves: training checkpoints that survive crashes, bad files and changes of layout
(Saver, find_resume, load_checkpoint; README "Checkpoints"), then Hugging Face safetensors in and out
(load_hf, save_hf, consolidate, and what train.init_from means). The two share the slicing: whatever layout
wrote a tensor, each rank reads only the byte ranges of its own slice.

    python checkpoint.py consolidate RUN_DIR/ckpt-00001000 OUT_DIR   # training checkpoint -> HF, no GPU
"""
import bisect
import contextlib
import json
import math
import os
import shutil
import struct
import sys
import threading
import time
import zlib
from dataclasses import replace

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import parallel
from model import Apertus, ModelConfig, XIELU, full_shape

class CheckpointError(Exception):
    """A checkpoint or HF directory that cannot be used; the message says which file and why."""

# ----------------------------------------------------------------------------- writing, with a checksum
# ckpt-00001000/ holds one rank-00003.safetensors per rank and meta.json (step, config, layout, each file's
# size and CRC-32). A rank file holds what its rank owns under ZeRO-1: for each parameter piece, elements
# [start, end) of the flattened tensor-parallel slice tp_rank, as "{kind}|{name}|{tp_rank}|{start}|{end}"
# (kind: master, the fp32 weights, or an optimizer moment); a parameter replicated over TP is written by
# tp_rank 0 only. CRC-32 (zlib): fast enough to compute while writing, and it catches truncation and any
# flipped byte, which is all a resume needs (it guards against accidents, not tampering).
_ST_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.bfloat16: "BF16", torch.float16: "F16",
              torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.int8: "I8", torch.bool: "BOOL"}
WRITE_BLOCK = 64 << 20

def _write_bytes(f, data):
    """The one place checkpoint bytes reach the file system (tests inject full disks here)."""
    f.write(data)

def write_safetensors(path, tensors: dict, metadata: dict) -> dict:
    """A safetensors file (8-byte header length, JSON header, the tensors' bytes), streamed from the
    tensors themselves (no second copy in memory), fsynced. Returns {"bytes": size, "crc32": checksum}."""
    header, offset = {"__metadata__": metadata}, 0
    for name, t in tensors.items():
        header[name] = dict(dtype=_ST_DTYPES[t.dtype], shape=list(t.shape), data_offsets=[offset, offset + t.nbytes])
        offset += t.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    views = [memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()) for t in tensors.values()]  # zero-copy
    crc, size = 0, 0
    with open(path, "wb") as f:
        for data in [struct.pack("<Q", len(head)), head] + [
                v[i:i + WRITE_BLOCK] for v in views for i in range(0, len(v), WRITE_BLOCK)]:
            _write_bytes(f, data)
            crc, size = zlib.crc32(data, crc), size + len(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": size, "crc32": crc}

def file_crc32(path, block=WRITE_BLOCK):
    crc = 0
    with open(path, "rb") as f:
        while data := f.read(block):
            crc = zlib.crc32(data, crc)
    return crc

def _write_json(path, obj):
    """Write, fsync, then rename into place: a reader sees the whole file or none of it."""
    with open(path + ".part", "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".part", path)

def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

def _barrier(grid):
    if grid.world > 1:
        torch.distributed.barrier()

# ----------------------------------------------------------------------------- saving
class Saver:
    """Training checkpoints every so often. The step loop waits only for snapshot(): this rank's tensors
    copied to (pinned) host memory. Then, in a background thread with async_save or else before save()
    returns, the commit: every rank writes and fsyncs ckpt-N.tmp/rank-R.safetensors, then rank-R.json (its
    size and CRC-32); rank 0 waits for all of them, writes meta.json, fsyncs, renames ckpt-N.tmp to ckpt-N
    and only then deletes older checkpoints. A crash at any moment leaves the previous checkpoint whole; a
    failed save (a full disk, a permission) is kept in self.error, and the previous checkpoints stay."""

    def __init__(self, out_dir, grid, keep=3, async_save=False, commit_timeout_s=3600.0):
        self.out_dir, self.grid, self.keep, self.async_save = out_dir, grid, keep, async_save
        self.commit_timeout_s, self.thread, self.error, self.pinned = commit_timeout_s, None, None, {}

    def save(self, step, opt, meta) -> float:
        """Start (async) or do (sync) the save of `step`. Returns the seconds the training loop was
        blocked. meta: what meta.json records beside the layout (config, data position, ...)."""
        t0 = time.perf_counter()
        self.wait()  # one save at a time: a file system slower than the interval shows as blocked time
        _barrier(self.grid)  # ... on every rank: no rank is still writing into an older .tmp
        tmp = os.path.join(self.out_dir, f"ckpt-{step:08d}.tmp")
        if self.grid.rank == 0:  # what a crash or a failed save left must not lend its files to this one
            try:
                for old in [c for c in _ckpt_dirs(self.out_dir) if c.endswith(".tmp")]:
                    shutil.rmtree(old, ignore_errors=True)
                os.makedirs(tmp)
            except OSError as e:  # every rank's write then fails too, and says so the same way
                self.error = _save_error(tmp, e)
        _barrier(self.grid)
        tensors, g = self.snapshot(opt), self.grid
        meta = {**meta, "step": step, "optimizer_steps": opt.state()[1], "layout": dict(
            tp=g.tp, cp=g.cp, pp=g.pp, dp=g.dp, world=g.world, virtual_stages=g.virtual_stages,
            bucket_size=opt.bucket_size)}
        blocked = time.perf_counter() - t0
        if self.async_save:
            self.thread = threading.Thread(target=self._write_and_commit, args=(tmp, tensors, meta),
                                           name=f"checkpoint-{step}", daemon=True)
            self.thread.start()
            return blocked
        self._write_and_commit(tmp, tensors, meta)
        _barrier(self.grid)
        return time.perf_counter() - t0

    def snapshot(self, opt):
        """This rank's pieces as host tensors (pinned on CUDA, reused from save to save)."""
        tensors, tp_rank = {}, self.grid.tp_rank
        for pc, named in opt.state()[0]:
            if opt.roles[pc.name].tp_dim is not None or tp_rank == 0:  # replicated over TP: tp_rank 0 writes it
                tensors.update({f"{kind}|{pc.name}|{tp_rank}|{pc.start}|{pc.end}": v for kind, v in named.items()})
        tensors["rng|torch"] = torch.get_rng_state()
        if self.grid.device.type == "cuda":
            tensors["rng|cuda"] = torch.cuda.get_rng_state(self.grid.device)
        host = {}
        for k, v in tensors.items():
            if v.device.type == "cuda":
                if k not in self.pinned or self.pinned[k].shape != v.shape:
                    self.pinned[k] = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
                host[k] = self.pinned[k].copy_(v.detach(), non_blocking=True)
            else:
                host[k] = v.detach().clone()  # the step loop may change v while the writer reads it
        parallel.wait_for_stream(self.grid.device)  # the copies are queued on the current stream
        return host

    def _write_and_commit(self, tmp, tensors, meta):
        name = f"rank-{self.grid.rank:05d}"
        try:
            info = write_safetensors(os.path.join(tmp, name + ".safetensors"), tensors, {"format": "pt"})
            _write_json(os.path.join(tmp, name + ".json"), info)  # complete or absent: rank 0 polls for it
            if self.grid.rank == 0:
                self._commit(tmp, meta)
        except Exception as e:  # noqa: BLE001  any failure, not only OSError
            self.error = self.error or _save_error(tmp, e)
            with contextlib.suppress(OSError):  # tell rank 0 not to wait for this rank
                _write_json(os.path.join(tmp, name + ".failed"), self.error)

    def _commit(self, tmp, meta):  # rank 0
        world, deadline, files = self.grid.world, time.monotonic() + self.commit_timeout_s, {}
        while len(files) < world:
            for r in range(world):
                stem = os.path.join(tmp, f"rank-{r:05d}")
                if r not in files and os.path.exists(stem + ".failed"):
                    raise OSError(f"rank {r} could not write its file", stem + ".safetensors")
                if r not in files and os.path.exists(stem + ".json"):
                    with open(stem + ".json") as f:
                        files[r] = json.load(f)
            if len(files) < world:
                if time.monotonic() > deadline:
                    raise OSError(f"only {len(files)} of {world} ranks wrote their files", tmp)
                time.sleep(0.05)
        meta["files"] = {f"rank-{r:05d}.safetensors": info for r, info in sorted(files.items())}
        _write_json(os.path.join(tmp, "meta.json"), meta)
        _fsync_dir(tmp)
        final = tmp[:-4]
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(self.out_dir)
        # the oldest beyond `keep` go, counted up to this one: a newer checkpoint the resume could not use
        # (corrupt, or only unreadable for a moment) stays until the run reaches its step and rewrites it
        older = [c for c in committed_checkpoints(self.out_dir) if c <= final]
        for old in older[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)

    def wait(self):
        """Block until the save in flight (if any) is written and committed."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None

def _save_error(tmp, e):
    name = os.path.basename(tmp).removesuffix(".tmp")
    if isinstance(e, OSError):
        return f"checkpoint {name} not saved: {e.strerror or e} ({e.filename or tmp})"
    return f"checkpoint {name} not saved: {type(e).__name__}: {e}"

def _ckpt_dirs(out_dir):
    """out_dir's ckpt-N and ckpt-N.tmp (a save that a crash or a failure left unfinished), by name."""
    names = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    return [os.path.join(out_dir, n) for n in names if n.startswith("ckpt-")]

def committed_checkpoints(out_dir):
    """Committed checkpoints (ckpt-N with meta.json), oldest first."""
    return [c for c in _ckpt_dirs(out_dir) if not c.endswith(".tmp") and os.path.exists(os.path.join(c, "meta.json"))]

def latest_checkpoint(out_dir):
    """The newest committed checkpoint in out_dir, or None (not verified: see find_resume)."""
    return next(reversed(committed_checkpoints(out_dir)), None)

def verify(path, grid) -> str | None:
    """None if this rank's share of the checkpoint is whole, else why not. File i is checked (size, then
    CRC-32) by rank i mod world alone: the ranks read the checkpoint once, and one rank reports a bad file."""
    try:
        with open(os.path.join(path, "meta.json")) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable meta.json ({e})"
    for name, info in sorted(files.items())[grid.rank::grid.world]:
        file = os.path.join(path, name)
        try:
            if (size := os.path.getsize(file)) != info["bytes"]:
                return f"{name} has {size} bytes, meta.json says {info['bytes']} (truncated?)"
            if file_crc32(file) != info["crc32"]:
                return f"{name} fails its CRC-32 check (corrupt)"
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as e:
            return f"{name} cannot be read ({e.strerror or e})"
    return None

def find_resume(out_dir, grid):
    """The newest checkpoint every rank finds whole; a bad one is skipped, named by the rank that checked it."""
    candidates = committed_checkpoints(out_dir)
    for path in reversed(candidates):
        problem = verify(path, grid)
        if not parallel.agree(grid, problem is not None)[0]:  # every rank finds it whole
            return path
        if problem is not None:
            print(f"checkpoint {path} is unusable: {problem}; falling back to an older one", flush=True)
    if candidates and grid.rank == 0:
        print(f"no usable checkpoint in {out_dir}: starting from step 0", flush=True)
    return None

# ----------------------------------------------------------------------------- reading, under any layout
def read_meta(path):
    """A checkpoint's meta.json and the model config it was written with."""
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        meta["layout"]["tp"], meta["layout"]["pp"], meta["layout"]["dp"]
        return meta, ModelConfig(**meta["config"]["model"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable meta.json ({type(e).__name__}: {e})") from None

def slice_runs(shape, dim, tp, tp_rank, src_tp, start, end):
    """Where elements [start, end) of a tensor-parallel slice lie in the slices of another split: the
    resharding arithmetic of a resume under another tp, as a pure function.

    The full tensor of `shape` is seen as [outer, D, inner] around the split dimension (D = shape[dim]):
    split tp ways, rank r holds the middle rows [r*D/tp, (r+1)*D/tp), a slice [outer, D/tp, inner] stored
    flattened. For elements [start, end) of reader slice tp_rank this returns runs (src_rank, src_start,
    length, at): `length` elements that lie at [src_start, src_start + length) of the flattened slice
    src_rank of a split src_tp ways, and at [at, at + length) of the request. The runs cover the request
    once, in order, each as long as it can be. dim None: a tensor that is not split (tp = src_tp = 1)."""
    if dim is None:  # whatever tp says: the whole tensor is one slice, [1, numel, 1]
        shape, dim, tp, tp_rank, src_tp = [math.prod(shape)], 0, 1, 0, 1
    inner = math.prod(shape[dim + 1:])
    rows, src_rows = shape[dim] // tp, shape[dim] // src_tp  # middle rows per slice, reader and writer
    per_outer = rows * inner            # elements of one outer index in the reader's slice
    first = tp_rank * rows              # the reader's first middle row, in the full tensor
    runs, pos = [], start               # runs: [src_rank, src_start, length, at], the last one still growing
    while pos < end:
        outer, within = divmod(pos, per_outer)
        row = first + within // inner                        # middle row in the full tensor
        src = row // src_rows                                # the writer's slice that holds it
        rows_left = min((src + 1) * src_rows, first + rows) - row  # up to its end or the reader's
        stop = min(pos + rows_left * inner - within % inner, end)
        src_start = (outer * src_rows + row - src * src_rows) * inner + within % inner
        if runs and runs[-1][0] == src and runs[-1][1] + runs[-1][2] == src_start:  # continues the last run
            runs[-1][2] += stop - pos
        else:
            runs.append([src, src_start, stop - pos, pos - start])
        pos = stop
    return [tuple(run) for run in runs]

class CheckpointReader:
    """Reads pieces of a checkpoint for any layout. The layout that wrote it (tp, cp, pp, dp, bucket_size in
    meta.json; no cp: 1) determines, by the same pure function as the optimizer (parallel.zero_layout),
    which rank file holds which elements, so only the files that hold a wanted piece are opened and only
    the wanted byte ranges are read (safetensors get_slice); bytes_read counts them."""

    def __init__(self, path):
        self.path = path
        self.meta, self.cfg = read_meta(path)
        lay = self.meta["layout"]
        self.tp, self.pp, self.dp, self.cp = tp, pp, dp, cp = lay["tp"], lay["pp"], lay["dp"], lay.get("cp", 1)
        zero = dp * cp  # ZeRO-1 partitions, in dp_cp_rank order: partition z is at (d, c) = divmod(z, cp)
        # name -> {the writer's tp rank: its pieces [(start, end, file's rank)] in order}, name -> (tp_dim, full shape)
        self.sources, self.shapes = {}, {}
        for pp_rank in range(pp):
            named = _stage_parameters(self.cfg, tp, pp, pp_rank, lay.get("virtual_stages", 1))
            numels = {n: p.numel() for n, p in named}
            index, buckets = parallel.zero_layout(list(numels.items()), zero, lay["bucket_size"])
            self.shapes.update({n: (p.role.tp_dim, full_shape(n, p)) for n, p in named})
            for z in range(zero):
                d, c = divmod(z, cp)
                for pc in parallel.zero_pieces(index, buckets, numels, z, zero):
                    for t in range(tp) if self.shapes[pc.name][0] is not None else [0]:
                        rank = parallel.rank_at(d, pp_rank, c, t, pp, cp, tp)
                        self.sources.setdefault(pc.name, {}).setdefault(t, []).append((pc.start, pc.end, rank))
        self.sources = {n: {t: sorted(p) for t, p in pieces.items()} for n, pieces in self.sources.items()}
        self.files, self.bytes_read = {}, 0

    def _open(self, rank):
        file = f"rank-{rank:05d}.safetensors"
        if file not in self.files:
            try:
                self.files[file] = safe_open(os.path.join(self.path, file), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{self.path}/{file}: cannot read ({e})") from None
        return self.files[file]

    def read(self, kind, name, tp, tp_rank, start, end, tp_dim=None):
        """Elements [start, end) of the flattened slice tp_rank of `name` split tp ways along tp_dim (tp = 1:
        the full tensor), fp32, gathered from whichever pieces the writing layout made. tp_dim comes from
        the reader's role: a writer at tp = 1 split nothing, so its layout cannot tell the dimension."""
        if name not in self.sources:
            raise CheckpointError(f"{self.path}: no {kind} for parameter {name}")
        dim, shape = self.shapes[name]
        dim = tp_dim if tp_dim is not None else dim
        out = torch.empty(end - start, dtype=torch.float32)
        pieces = self.sources[name]
        for src, src_start, length, at in slice_runs(shape, dim, tp, tp_rank, self.tp, start, end):
            k = max(bisect.bisect_right(pieces.get(src, []), src_start, key=lambda piece: piece[0]) - 1, 0)
            for s, e, rank in pieces.get(src, [])[k:]:  # the pieces that overlap the run
                if s >= src_start + length:
                    break
                lo, hi = max(src_start, s), min(src_start + length, e)
                if lo < hi:
                    piece = self._open(rank).get_slice(f"{kind}|{name}|{src}|{s}|{e}")
                    out[at + lo - src_start:at + hi - src_start] = piece[lo - s:hi - s]
                    self.bytes_read += (hi - lo) * 4
        return out

    def piece_reader(self, opt, grid):
        """read(piece, kind) for DistributedOptimizer.load_state: this rank's pieces, whatever layout wrote them."""
        return lambda pc, kind: self.read(kind, pc.name, grid.tp, grid.tp_rank, pc.start, pc.end,
                                          opt.roles[pc.name].tp_dim)

    def full(self, kind, name):
        dim, shape = self.shapes[name]
        return self.read(kind, name, 1, 0, 0, math.prod(shape)).view(shape)

def _stage_parameters(cfg, tp, pp, pp_rank, vp=1):
    """(name, meta tensor) of a stage's TP-local parameters in model order, as the writer's optimizer laid them out."""
    grid = parallel.Grid(tp=tp, pp=pp, pp_rank=pp_rank, virtual_stages=vp)
    with torch.device("meta"):
        m = Apertus(cfg)
    parallel.keep_stage(m, grid)
    parallel.parallelize(m, grid)
    return list(m.named_parameters())

@torch.no_grad()
def load_checkpoint(path, opt, grid, optimizer_name):
    """Fill the distributed optimizer (master pieces, optimizer moments, its step count) and the model
    from a checkpoint written under any layout. Returns (the training step, meta.json, bytes read)."""
    ck = CheckpointReader(path)
    if ck.meta["optimizer"] != optimizer_name:
        raise CheckpointError(f"{path} holds {ck.meta['optimizer']} state, this run uses {optimizer_name}")
    opt.load_state(ck.meta["optimizer_steps"], ck.piece_reader(opt, grid))
    if ck.meta["layout"]["world"] == grid.world:  # RNG streams belong to ranks: only meaningful for the same world
        f = ck._open(grid.rank)
        torch.set_rng_state(f.get_tensor("rng|torch"))
        if grid.device.type == "cuda" and "rng|cuda" in f.keys():
            torch.cuda.set_rng_state(f.get_tensor("rng|cuda"), grid.device)
    return ck.meta["step"], ck.meta, ck.bytes_read

# ============================================================================= Hugging Face: the format
def config_from_hf(hf: dict) -> ModelConfig:
    """config.json -> ModelConfig. RoPE comes in two spellings: top-level rope_theta + rope_scaling
    (transformers 4.x, the released checkpoints) or one rope_parameters dict (transformers 5)."""
    if not isinstance(hf, dict):
        raise CheckpointError("not a JSON object")
    if hf.get("model_type") != "apertus":
        raise CheckpointError(f"model_type is {hf.get('model_type')!r}, expected 'apertus'")
    try:
        rope = dict(hf.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 12_000_000.0))
        scaling = rope or hf.get("rope_scaling")
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("default", "llama3"):
                raise CheckpointError(f"unsupported RoPE type {kind!r} (only llama3 or default)")
            scaling = None if kind == "default" else {"rope_type": "llama3", **{k: float(scaling[k]) for k in (
                "factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor")}}
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
        raise CheckpointError(f"the field {e.args[0]!r} is missing") from None
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(str(e)) from None

def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    # the transformers 4.x spelling of RoPE, which the released checkpoints use and transformers 5 reads
    same = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "vocab_size", "max_position_embeddings", "rope_theta")  # ModelConfig speaks HF's names
    return {
        "architectures": ["ApertusForCausalLM"], "model_type": "apertus", **{k: getattr(cfg, k) for k in same},
        # spelled out even when off: transformers 5 would otherwise fill in Apertus' llama3 default
        "rope_scaling": cfg.rope_scaling or {"rope_type": "default"}, "rms_norm_eps": cfg.rms_norm_eps,
        "hidden_act": "xielu", "tie_word_embeddings": False, "attention_bias": False,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id, "torch_dtype": str(dtype).removeprefix("torch.")}

def read_hf_config(path) -> ModelConfig:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory (a Hugging Face model directory holds config.json "
                              f"and safetensors; a training checkpoint, meta.json and rank files)")
    try:
        with open(cfg_path) as f:
            return config_from_hf(json.load(f))
    except FileNotFoundError:
        raise CheckpointError(f"{cfg_path}: not found (is {path} a Hugging Face model directory?)") from None
    except OSError as e:
        raise CheckpointError(f"{cfg_path}: cannot be read ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: malformed JSON ({e})") from None
    except CheckpointError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None

def hf_index(path) -> dict:
    """tensor name -> its safetensors file in an HF directory: the index's weight_map, or the files' headers."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors files")
    where = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            where.update({k: file for k in f.keys()})
    return where

@torch.no_grad()
def load_hf(path, device="cpu", dtype=torch.float32) -> Apertus:
    """Build the model from a Hugging Face Apertus directory, streaming tensor by tensor: the model is
    allocated once (empty) and each tensor is copied into place as it is read."""
    with torch.device("meta"):
        model = Apertus(read_hf_config(path))
    model = model.to_empty(device=device).to(dtype)
    for m in model.modules():  # buffers the file may lack (beta, eps): their defined values
        if isinstance(m, XIELU):
            m.reset_parameters()
    expected = dict(model.state_dict(keep_vars=True))
    params = {n for n, _ in model.named_parameters()}
    for file in sorted(set(hf_index(path).values())):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq"):
                    continue  # recomputed from the config
                if name not in expected:
                    raise CheckpointError(f"{file}: unexpected tensor {name} (not an Apertus weight)")
                t = f.get_tensor(name)
                _check_shape(file, name, t.shape, expected[name].shape)
                expected[name].copy_(t)
                params.discard(name)
    if params:
        raise CheckpointError(f"{path}: missing tensor {sorted(params)[0]}"
                              + (f" and {len(params) - 1} more" if len(params) > 1 else ""))
    return model

def _check_shape(file, name, shape, want):
    if tuple(shape) != tuple(want):
        raise CheckpointError(f"{file}: tensor {name} has shape {tuple(shape)}, the config implies {tuple(want)}")

def save_hf(model: Apertus, path, dtype=None, max_file_bytes=5 * 2**30):
    """Write config.json and safetensors that transformers.AutoModelForCausalLM loads."""
    state = model.state_dict()
    dtype = dtype or next(iter(state.values())).dtype
    write_hf(model.config, ((n, t.to(dtype)) for n, t in state.items()), path, dtype, max_file_bytes)

def write_hf(cfg: ModelConfig, tensors, path, dtype, max_file_bytes=5 * 2**30):
    """tensors: (HF name, tensor) pairs, consumed one at a time (at most one file's worth in memory). Above
    max_file_bytes, split as transformers does: model-0000i-of-0000n.safetensors plus model.safetensors.index.json."""
    os.makedirs(path, exist_ok=True)
    files, current, size, total = [], {}, 0, 0  # files: (temporary name, tensor names) of each one written
    for name, t in tensors:
        if current and size + t.nbytes > max_file_bytes:
            files.append(_write_hf_file(path, len(files), current))
            current, size = {}, 0
        current[name] = t.detach().contiguous().cpu()
        size, total = size + t.nbytes, total + t.nbytes
    files.append(_write_hf_file(path, len(files), current))
    n = len(files)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for (tmp, _), name in zip(files, names):
        os.replace(tmp, os.path.join(path, name))
    if n > 1:
        weight_map = {k: name for (_, keys), name in zip(files, names) for k in keys}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg, dtype), f, indent=2)

def _write_hf_file(path, i, tensors):
    tmp = os.path.join(path, f".file-{i}.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    return tmp, list(tensors)

# ----------------------------------------------------------------------------- HF weights into a training run
def hf_dtype(path) -> torch.dtype:
    """The dtype of an HF directory's weights (read off one tensor's header)."""
    where = hf_index(path)
    name = next(k for k in where if k.endswith("q_proj.weight"))
    with safe_open(where[name], framework="pt") as f:
        return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[f.get_slice(name).get_dtype()]

@torch.no_grad()
def load_hf_into(opt, path, grid):
    """Fill a training run's master weights (and so its model) from a Hugging Face directory. Each rank
    reads, through get_slice, only the rows of its tensor-parallel slice that hold its ZeRO pieces, in
    the file's own precision (an fp32 file stays exact in the fp32 masters)."""
    where = hf_index(path)
    files, nbytes = {}, 0

    def read(piece, kind):
        nonlocal nbytes
        name, role = piece.name, opt.roles[piece.name]
        if name not in where:
            raise CheckpointError(f"{path}: no tensor {name} in the safetensors files")
        if where[name] not in files:
            files[where[name]] = safe_open(where[name], framework="pt")
        sl = files[where[name]].get_slice(name)
        p = opt.model.get_parameter(name)
        _check_shape(where[name], name, sl.get_shape(), full_shape(name, p))
        local = list(p.shape)
        row = math.prod(local[1:])  # elements per row of this rank's slice
        r0, r1 = piece.start // max(row, 1), -(-piece.end // max(row, 1))  # the rows holding the piece
        index = [slice(r0, r1)] + [slice(None)] * (len(local) - 1)
        if role.tp_dim is not None:  # this rank's slice of the full tensor (and along dim 0, the piece's rows)
            lo = grid.tp_rank * local[role.tp_dim]
            index[role.tp_dim] = slice(lo + r0, lo + r1) if role.tp_dim == 0 else slice(lo, lo + local[role.tp_dim])
        block = sl[tuple(index)] if local else sl[:]
        nbytes += block.nbytes
        return block.flatten()[piece.start - r0 * row:piece.end - r0 * row]
    opt.load_state(opt.state()[1], read, kinds=("master",))
    return nbytes

def consolidate(ckpt_path, out_dir, dtype=torch.bfloat16):
    """A training checkpoint (any layout) -> a Hugging Face directory, one tensor at a time, on CPU."""
    ck = CheckpointReader(ckpt_path)
    with torch.device("meta"):
        names = list(Apertus(ck.cfg).state_dict())
    defaults = XIELU()  # beta and eps are fixed buffers, not trained

    def tensor(name):
        if name.endswith(("act_fn.beta", "act_fn.eps")):  # a copy each: safetensors refuses shared memory
            return getattr(defaults, name.rsplit(".", 1)[1]).to(dtype).clone()
        return ck.full("master", name).to(dtype)
    write_hf(ck.cfg, ((name, tensor(name)) for name in names), out_dir, dtype)

# ----------------------------------------------------------------------------- train.init_from
# What a run that starts from a Hugging Face directory or a training checkpoint (ckpt-N: a long-context
# stage's previous one) takes from it, all here: the architecture, the weights, the dtype to export in and
# the tokenizer files to export. ROPE_KEYS shape no parameter: a stage sets its own (a higher theta).
ROPE_KEYS = ("rope_theta", "rope_scaling", "max_position_embeddings")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")

def init_from_config(init_from, out_dir, mine: ModelConfig, keys) -> ModelConfig:
    """The architecture of a run with train.init_from: its config.json (or meta.json), or, once out_dir holds a
    checkpoint, that one's (a resume does not read init_from: it may be gone). `keys`: the [model] keys the
    config file sets; each must agree (init_std apart: a config.json has none; ROPE_KEYS: the file wins)."""
    theirs, where = None, latest_checkpoint(out_dir)
    if where:
        with contextlib.suppress(CheckpointError):  # the resume will say so and fall back
            theirs, where = read_meta(where)[1], os.path.join(where, "meta.json")
    if theirs is None:
        if checkpoints := committed_checkpoints(init_from):  # its config.json is a run's, not a model's
            raise CheckpointError(f"train.init_from: {init_from} is a run directory: name one of its checkpoints "
                                  f"({os.path.basename(checkpoints[-1])} is the newest)")
        try:
            if os.path.exists(os.path.join(init_from, "meta.json")):  # a training checkpoint
                theirs, where = read_meta(init_from)[1], os.path.join(init_from, "meta.json")
            else:
                theirs, where = read_hf_config(init_from), os.path.join(init_from, "config.json")
        except CheckpointError as e:
            raise CheckpointError(f"train.init_from: {e}") from None
    for k in keys:
        if getattr(mine, k) != getattr(theirs, k) and k not in ("init_std", *ROPE_KEYS):
            raise CheckpointError(f"model.{k} = {getattr(mine, k)!r} disagrees with {getattr(theirs, k)!r} in {where}")
    return replace(theirs, init_std=mine.init_std, **{k: getattr(mine, k) for k in keys if k in ROPE_KEYS})

def load_init_from(opt, init_from, grid):
    """init_from's weights into a run of any layout (of a checkpoint, its fp32 masters alone: the optimizer
    starts afresh, at step 0). Returns (bytes this rank read, the dtype to export in)."""
    if os.path.exists(os.path.join(init_from, "meta.json")):
        ck = CheckpointReader(init_from)
        opt.load_state(0, ck.piece_reader(opt, grid), kinds=("master",))
        return ck.bytes_read, ck.meta.get("export_dtype", "bfloat16")
    return load_hf_into(opt, init_from, grid), str(hf_dtype(init_from)).removeprefix("torch.")

def export_hf(ckpt_path, out_dir, dtype, init_from=""):
    """A checkpoint -> an HF directory in `dtype` (a name: "bfloat16"), plus init_from's tokenizer files that exist."""
    consolidate(ckpt_path, out_dir, getattr(torch, dtype))
    for name in TOKENIZER_FILES:
        if init_from and os.path.exists(os.path.join(init_from, name)):
            shutil.copy(os.path.join(init_from, name), out_dir)

if __name__ == "__main__":
    if len(sys.argv) not in (4, 5) or sys.argv[1] != "consolidate":
        sys.exit("usage: python checkpoint.py consolidate CHECKPOINT_DIR HF_OUT_DIR [bfloat16|float32]")
    try:
        consolidate(sys.argv[2], sys.argv[3], getattr(torch, sys.argv[4]) if len(sys.argv) == 5 else torch.bfloat16)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {sys.argv[3]}")
