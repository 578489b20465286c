r"""
What a training run reads: the [data] section; Megatron-LM's indexed dataset (reader and writer, so that the format
lives in one place; prepare.py makes datasets); a source's samples, in a new order each epoch (Source); their blend,
as Megatron's BlendedDataset (`blend`); the DataLoader: curriculum stages, each DP rank's micro-batches, the cursor.

A dataset is a path prefix and two files, exactly as Megatron-LM writes them (github.com/NVIDIA/Megatron-LM,
megatron/core/datasets/indexed_dataset.py: _IndexWriter and _IndexReader; tools/preprocess_data.py makes
them), so that Megatron's files train here and ours train there. PREFIX.bin holds the token ids of every
sequence back to back, one numpy dtype, no header. PREFIX.idx, little endian:

    | offset           | bytes | field                                                              |
    |------------------|-------|--------------------------------------------------------------------|
    | 0                | 9     | magic b"MMIDIDX\x00\x00"                                           |
    | 9                | 8     | version, uint64 = 1                                                |
    | 17               | 1     | dtype code, uint8 (Megatron's DType, DTYPES below)                 |
    | 18               | 8     | sequence count S, uint64                                           |
    | 26               | 8     | document-index count D, uint64                                     |
    | 34               | 4 S   | sequence lengths, int32 (tokens)                                   |
    | 34 + 4 S         | 8 S   | sequence pointers, int64 (byte offsets into the .bin)              |
    | 34 + 12 S        | 8 D   | document indices, int64: document d is sequences [doc[d], doc[d+1]) |

prepare.py writes one sequence per document, <s> + tokens + </s>, so the document indices are 0, 1, ..., S.
"""
import bisect
import contextlib
import functools
import hashlib
import math
import os
import re
import struct
from dataclasses import dataclass, field

import numpy as np
import torch

@dataclass
class DataConfig:
    """The [data] section: the training data is `dataset`, `sources` or `stages` (at most one); none: the demo corpus.

        [[data.stages]]                          # a curriculum: each stage a fresh blend of its own weights
        start_step = 0
        sources = [{name = "web", prefix = "data/web", weight = 1}]
        [[data.stages]]
        start_tokens = 5_000_000_000_000         # or start_step; a token count starts the stage at the first
        sources = [{name = "web", prefix = "data/web", weight = 0.6},   # step that begins at or past it
                   {name = "math", prefix = "data/math", weight = 0.4}]"""
    dataset: str = ""        # path prefix of one dataset (PREFIX.idx + PREFIX.bin), weight 1; "" = the demo corpus
    tokenizer: str = "byte"  # "byte" or the path of a Mistral tekken JSON (e.g. tekken_240718.json)
    seq_len: int = 256       # tokens per training sequence
    eval_batches: int = 4    # global batches of each source's validation part in one validation pass
    sources: list = field(default_factory=list)  # a mixture: tables {name, prefix, weight}; weights > 0, divided
    #                          by their sum (blend_weights); a name (letters, digits, _ . -) labels the source's
    #                          metrics (tokens/<name>, val_loss/<name>) and keys its shuffle, so renaming reshuffles;
    #                          min_doc_tokens = N (optional) keeps only its documents of at least N tokens
    stages: list = field(default_factory=list)   # a curriculum: tables {start_step or start_tokens, sources};
    #                          the first starts at 0; a source keeps its place (samples already read) across
    #                          stages, and the same name must mean the same prefix in every stage
    val_fraction: float = 0.01  # the last share of each source's samples (at least one) held out for validation

    def __post_init__(self):
        if sum(map(bool, (self.dataset, self.sources, self.stages))) > 1:
            raise ValueError("set only one of data.dataset, data.sources and data.stages")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.seq_len < 1 or self.eval_batches < 1:
            raise ValueError(f"data.seq_len ({self.seq_len}) and data.eval_batches ({self.eval_batches}) must be positive")
        _check_sources("data.sources", self.sources, empty_ok=True)
        for i, stage in enumerate(self.stages):
            key = f"data.stages[{i}]"
            if not isinstance(stage, dict) or set(stage) - {"start_step", "start_tokens", "sources"}:
                raise ValueError(f"{key} must be a table of start_step (or start_tokens) and sources, got {stage!r}")
            starts = [k for k in ("start_step", "start_tokens") if k in stage]
            if len(starts) != 1 or not _is_int(stage[starts[0]]) or stage[starts[0]] < 0:
                raise ValueError(f"{key} needs one of start_step or start_tokens, a non-negative integer")
            _check_sources(f"{key}.sources", stage.get("sources"))
        seen = {}  # name -> (prefix, min_doc_tokens), the same in every stage (unique names within one)
        for k, stage in enumerate(self.stages):
            for j, s in enumerate(stage["sources"]):
                name, here = s["name"], (s["prefix"], s.get("min_doc_tokens", 0))
                if (was := seen.setdefault(name, here)) != here:
                    i = int(was[0] == here[0])  # 0: the prefix differs, else min_doc_tokens
                    raise ValueError(f"data.stages[{k}].sources[{j}]: source {name!r} has "
                                     f"{('prefix', 'min_doc_tokens')[i]} {here[i]!r} here and {was[i]!r} elsewhere")

def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)

def _check_sources(key, sources, empty_ok=False):
    if not isinstance(sources, list) or not (sources or empty_ok):
        raise ValueError(f"{key} must be a non-empty list of tables {{name, prefix, weight}}")
    names = set()
    for i, s in enumerate(sources):
        k = f"{key}[{i}]"
        if not isinstance(s, dict) or set(s) - {"min_doc_tokens"} != {"name", "prefix", "weight"}:
            raise ValueError(f"{k} must be a table with exactly name, prefix and weight (optionally min_doc_tokens), got {s!r}")
        if not _is_int(s.get("min_doc_tokens", 1)) or s.get("min_doc_tokens", 1) < 1:
            raise ValueError(f"{k}.min_doc_tokens must be a positive integer, got {s['min_doc_tokens']!r}")
        if not isinstance(s["name"], str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", s["name"]) or s["name"] in names:
            raise ValueError(f"{k}.name must be a unique name of letters, digits, _ . or -, got {s['name']!r}")
        if not isinstance(s["prefix"], str) or not s["prefix"]:
            raise ValueError(f"{k}.prefix must be the path prefix of a dataset, got {s['prefix']!r}")
        w = s["weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w < math.inf:
            raise ValueError(f"{k}.weight must be a positive number, got {w!r}")
        names.add(s["name"])

def stage_table(cfg: DataConfig, global_batch: int, resolve=lambda prefix: prefix) -> list:
    """The [data] section as the DataLoader's stage table: [(start step, [(name, prefix, weight), ...]), ...]
    (with min_doc_tokens: (name, prefix, weight, min_doc_tokens)). resolve(prefix) -> the path prefix to read
    (train.py passes prepare.resolve_prefix, which makes a "demo:<kind>" corpus on first use)."""
    entries = lambda sources: [(s["name"], resolve(s["prefix"]), float(s["weight"]),  # noqa: E731
                               *[s[k] for k in ("min_doc_tokens",) if k in s]) for s in sources]
    if cfg.stages:
        table = []
        for i, stage in enumerate(cfg.stages):
            start = (stage["start_step"] if "start_step" in stage
                     else -(-stage["start_tokens"] // (global_batch * cfg.seq_len)))  # ceil(tokens / step)
            table.append((start, entries(stage["sources"])))
            if i == 0 and start != 0 or i > 0 and start <= table[i - 1][0]:
                raise DataError(f"data.stages[{i}] starts at step {start}: the first stage must start at step 0 "
                                f"and each later one after the one before")
        return table
    if cfg.sources:
        return [(0, entries(cfg.sources))]
    prefix = resolve(cfg.dataset or "demo:all")
    return [(0, [(os.path.basename(prefix) or "data", prefix, 1.0)])]

class DataError(Exception):
    """A problem with the user's data or settings; the message is one line and names the file."""

# ----------------------------------------------------------------------------- Megatron-LM's indexed dataset
INDEX_MAGIC, INDEX_VERSION = b"MMIDIDX\x00\x00", 1
INDEX_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, S, D: 34 bytes, no padding
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}

def _pread(f, offset: int, count: int, dtype) -> np.ndarray:
    """`count` items of `dtype` at byte `offset` of the open file f: one positioned read."""
    dtype = np.dtype(dtype)
    raw = os.pread(f.fileno(), count * dtype.itemsize, offset)
    if len(raw) != count * dtype.itemsize:
        raise DataError(f"{f.name}: ends at byte {offset + len(raw)}, before what its index says (changed while in use?)")
    return np.frombuffer(raw, dtype=dtype)

class IndexedDataset:
    """PREFIX.idx + PREFIX.bin, read on demand with positioned reads: opening reads the header and the
    last sequence's length and pointer, nothing else, and a batch reads the bytes of its own samples.
    (Megatron maps both files: every page a map touches, and the whole page-cache folio around it, counts as
    resident memory; the first batch of a cached 100-million-document index took 1.2 GB that way, 0.3 GB with
    positioned reads, see prepare.bench_index.) values: the dataset may hold floats (a source's rewards)."""

    def __init__(self, prefix: str, vocab_size: int | None = None, values: bool = False):
        self.prefix, self.idx_path, self.bin_path = prefix, prefix + ".idx", prefix + ".bin"
        try:
            idx_size = os.path.getsize(self.idx_path)
            with open(self.idx_path, "rb") as f:
                head = f.read(INDEX_HEADER.size)
        except OSError as e:
            raise DataError(f"{self.idx_path}: cannot read the index ({e.strerror}); "
                            f"run `python prepare.py INPUT --out {prefix}`") from None
        if not INDEX_MAGIC.startswith(head[:9]):
            raise DataError(f"{self.idx_path}: not a Megatron indexed dataset (no {INDEX_MAGIC!r} header)")
        if len(head) < INDEX_HEADER.size:  # the magic, or the start of it, and then the file ends
            raise DataError(f"{self.idx_path}: truncated index: {len(head)} bytes, shorter than the "
                            f"{INDEX_HEADER.size}-byte header")
        _, version, code, S, D = INDEX_HEADER.unpack(head)
        if version != INDEX_VERSION:
            raise DataError(f"{self.idx_path}: unknown index version {version} (this reader knows {INDEX_VERSION})")
        if code not in DTYPES:
            raise DataError(f"{self.idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPES[code]).newbyteorder("<")
        if self.dtype.kind == "f" and not values:
            raise DataError(f"{self.idx_path}: holds {self.dtype.name} values, not token ids")
        if vocab_size is not None and np.iinfo(self.dtype).max < vocab_size - 1:
            raise DataError(f"{self.idx_path}: dtype {self.dtype.name} cannot hold the ids of a vocabulary of "
                            f"{vocab_size} (wrong tokenizer for this model?)")
        need = INDEX_HEADER.size + 12 * S + 8 * D
        if idx_size not in (need, need + S):  # + S: the multimodal variant's sequence modes, int8[S]
            raise DataError(f"{self.idx_path}: {'truncated' if idx_size < need else 'corrupt'} index: the header says "
                            f"{S} sequences and {D} document indices ({need} bytes), the file holds {idx_size} bytes")
        if not os.path.exists(self.bin_path):
            raise DataError(f"{self.idx_path}: its token file {self.bin_path} is missing")
        self.num_sequences, self.num_documents = S, max(D - 1, 0)
        self._at = {"lengths": INDEX_HEADER.size, "pointers": INDEX_HEADER.size + 4 * S,
                    "doc_idx": INDEX_HEADER.size + 12 * S}  # where each array starts in the .idx
        bin_size = os.path.getsize(self.bin_path)
        expect = int(self.pointers(S - 1, S)[0]) + int(self.lengths(S - 1, S)[0]) * self.dtype.itemsize if S else 0
        if bin_size != expect:
            raise DataError(f"{self.bin_path}: {'truncated' if bin_size < expect else 'corrupt'} token file: its index "
                            f"says {expect} bytes, the file holds {bin_size}")
        self.num_tokens = bin_size // self.dtype.itemsize

    def __len__(self) -> int:
        return self.num_sequences

    def _index(self, name, dtype, a, b, idx=None):  # entries a ... b-1 of an .idx array (the table at the top)
        with open(self.idx_path, "rb") if idx is None else contextlib.nullcontext(idx) as f:  # idx: the .idx, open
            return _pread(f, self._at[name] + np.dtype(dtype).itemsize * a, b - a, dtype)

    lengths = functools.partialmethod(_index, "lengths", "<i4")  # (a, b) -> int32 [b - a], tokens
    pointers = functools.partialmethod(_index, "pointers", "<i8")  # (a, b) -> int64 [b - a], bytes into the .bin
    doc_indices = functools.partialmethod(_index, "doc_idx", "<i8")  # (a, b) -> int64 [b - a]

    def sequences(self, ks) -> list[np.ndarray]:
        """The tokens of sequences ks (two reads of the .idx and one of the .bin each)."""
        with open(self.idx_path, "rb") as idx, open(self.bin_path, "rb") as bin_:
            return [_pread(bin_, int(self.pointers(k, k + 1, idx)[0]), int(self.lengths(k, k + 1, idx)[0]), self.dtype)
                    for k in map(int, ks)]

    def sequence(self, k: int) -> np.ndarray:
        return self.sequences([k])[0]

    def document(self, d: int) -> np.ndarray:
        a, b = self.doc_indices(d, d + 2).tolist()
        return np.concatenate([np.empty(0, self.dtype), *self.sequences(range(a, b))])

    def windows(self, starts, count: int) -> np.ndarray:
        """[len(starts), count]: tokens [s, s + count) of the .bin read as one stream, for each s."""
        with open(self.bin_path, "rb") as f:
            return np.stack([_pread(f, int(s) * self.dtype.itemsize, count, self.dtype) for s in starts])

class IndexedDatasetWriter:
    """Streams documents (one sequence each) into PREFIX.bin and PREFIX.idx under temporary names; on a
    clean exit from `with`, writes the index and renames both, the .bin first (an .idx is never without
    its .bin); on an error, removes them. Memory stays flat: the lengths go to a side file until the end."""

    def __init__(self, prefix: str, dtype):
        self.prefix, self.dtype = prefix, np.dtype(dtype).newbyteorder("<")
        self.tmp = f".tmp-{os.getpid()}-{os.urandom(4).hex()}"  # unique: two writers of one prefix never collide
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)  # --out data/new/mine: made here
        self.bin, self.lengths = open(prefix + ".bin" + self.tmp, "wb"), open(prefix + ".lengths" + self.tmp, "w+b")
        self.sequences, self.num_tokens = 0, 0

    def add_document(self, tokens) -> None:
        self.add_documents(tokens, [len(tokens)])

    def add_documents(self, tokens, lengths) -> None:
        """Several documents at once: their tokens back to back and the length of each."""
        tokens, lengths = np.asarray(tokens), np.asarray(lengths, dtype=np.int64)
        assert lengths.sum() == tokens.size and (lengths <= np.iinfo(np.int32).max).all()
        self.bin.write(tokens.astype(self.dtype, copy=False).tobytes())
        self.lengths.write(lengths.astype("<i4").tobytes())
        self.sequences, self.num_tokens = self.sequences + len(lengths), self.num_tokens + tokens.size

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        self.bin.close()
        try:
            if kind is None:
                with open(self.prefix + ".idx" + self.tmp, "wb") as f:
                    write_index(f, self.dtype, self.sequences, self._lengths)
                os.replace(self.prefix + ".bin" + self.tmp, self.prefix + ".bin")
                os.replace(self.prefix + ".idx" + self.tmp, self.prefix + ".idx")
        finally:
            self.lengths.close()
            for ext in (".bin", ".idx", ".lengths"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.prefix + ext + self.tmp)

    def _lengths(self, chunk: int = 1 << 22):  # the lengths written so far, in int32 blocks
        self.lengths.seek(0)
        while (block := np.frombuffer(self.lengths.read(4 * chunk), dtype="<i4")).size:
            yield block

def write_index(f, dtype, sequences: int, lengths, chunk: int = 1 << 22) -> None:
    """The .idx of `sequences` sequences of `dtype` tokens back to back in the .bin, one document each,
    into the open file f. lengths() yields their lengths (int32 arrays, in order); it is called twice,
    for the lengths and then for the pointers (their running sum x itemsize), so memory stays flat."""
    code = {np.dtype(v): k for k, v in DTYPES.items()}[np.dtype(dtype).newbyteorder("=")]
    f.write(INDEX_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, code, sequences, sequences + 1))
    f.writelines(np.asarray(block, dtype="<i4").tobytes() for block in lengths())
    pointer = 0
    for block in lengths():
        ends = pointer + np.cumsum(block, dtype=np.int64) * np.dtype(dtype).itemsize
        f.write(np.concatenate([[pointer], ends[:-1]]).astype("<i8").tobytes())
        pointer = int(ends[-1])
    for a in range(0, sequences + 1, chunk):  # document d = sequence d
        f.write(np.arange(a, min(a + chunk, sequences + 1), dtype="<i8").tobytes())

# ----------------------------------------------------------------------------- sampling: samples, order, blend
def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (Steele, Lea and Flood 2014): a 64-bit hash, in numpy uint64 (which wraps)."""
    x = (x ^ (x >> 30)) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> 27)) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> 31)

def permute(j, n: int, key: np.ndarray) -> np.ndarray:
    """A pseudo-random bijection of [0, n), applied to the integers j: a 4-round Feistel network (Luby and Rackoff
    1988) on 2h bits, 2^2h >= n, keyed by the four uint64 of `key`, with cycle walking (Black and Rogaway 2002):
    a value that lands at or past n is encrypted again until it falls inside. O(1) memory, a pure function."""
    h = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << h) - 1)

    def encrypt(v):
        left, right = v >> h, v & mask
        for k in key:
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        return (left << h) | right

    out = encrypt(np.asarray(j, dtype=np.uint64))
    while (outside := out >= n).any():  # 2^2h <= 4n: at most 4 encryptions per value on average
        out[outside] = encrypt(out[outside])
    return out.astype(np.int64)

class Source:
    """One source of the blend: a dataset's samples of T + 1 = seq_len + 1 tokens (x its first T, y its last T: one
    token of overlap, as in Megatron-LM), the last `val_fraction` of them (at least one) held out for validation.

    plain, the usual case: the .bin is one stream of tokens (sequences back to back, as Megatron writes them) and
        sample k is the window stream[k*T : k*T + T + 1]; with min_doc_tokens = N, the stream is its documents of
        at least N tokens, back to back;
    packed, when PREFIX.mask.idx/.bin lies next to it (a uint8 0/1 dataset of the same sequences, chat data): sample
        k is sequence k, of exactly T + 1 tokens, and position j of y counts in the loss where its mask at j + 1 is 1;
    pairs, when PREFIX.rewards.idx/.bin lies beside the mask too (prepare --preferences): sample k is the packed
        sequences 2k (prompt + chosen completion) and 2k + 1 (prompt + rejected); rewards sequence k (float64) is
        [R(chosen), R(rejected), the rewards of the reference model's completions...] or empty."""

    def __init__(self, name: str, prefix: str, seq_len: int, val_fraction: float, vocab_size: int | None,
                 min_doc_tokens: int = 0):
        self.name, self.seq_len, self.kept = name, seq_len, None
        self.data, self.mask, self.rewards = IndexedDataset(prefix, vocab_size), None, None
        if os.path.exists(prefix + ".mask.idx"):
            if min_doc_tokens:
                raise DataError(f"source {name!r}: min_doc_tokens keeps documents of a plain source; {prefix} is packed")
            self.mask = IndexedDataset(prefix + ".mask")
            if self.mask.dtype != np.uint8 or len(self.mask) != len(self.data):
                raise DataError(f"{self.mask.idx_path}: a loss mask must be uint8 with one sequence per sequence "
                                f"of {self.data.idx_path} ({len(self.data)}), not {self.mask.dtype.name} x {len(self.mask)}")
            total = len(self.data)
            if os.path.exists(prefix + ".rewards.idx"):  # preference pairs: a sample is two sequences
                self.rewards, total = IndexedDataset(prefix + ".rewards", values=True), len(self.data) // 2
                if 2 * len(self.rewards) != len(self.data):
                    raise DataError(f"{self.rewards.idx_path}: must hold one sequence per two of {self.data.idx_path}")
        else:
            self._check_back_to_back()
            if min_doc_tokens:
                self.kept = self._keep(min_doc_tokens)
            total = max((self.data.num_tokens if self.kept is None else int(self.kept[1][-1])) - 1, 0) // seq_len
        self.num_val = max(1, int(total * val_fraction))
        self.num_train = total - self.num_val
        if self.num_train < 1:
            what = "sequences" if self.mask is not None else f"samples of seq_len {seq_len} (+1 for the targets)"
            raise DataError(f"{self.data.bin_path}: holds {total} {what}: too few for training and validation")

    def train_samples(self, positions: np.ndarray, seed: int) -> np.ndarray:
        """The train samples at these positions of the source's endless stream: position k is in epoch
        k // n, at place k % n of that epoch's order, a bijection keyed by (seed, name, epoch)."""
        n, out = self.num_train, np.empty(len(positions), np.int64)
        for epoch in np.unique(positions // n):
            at = positions // n == epoch
            digest = hashlib.blake2b(f"{seed}/{self.name}/{epoch}".encode(), digest_size=32).digest()
            out[at] = permute(positions[at] % n, n, np.frombuffer(digest, dtype="<u8"))
        return out

    def read(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows [len, T + 1] int64 of these samples, and for a packed source their masks [len, T + 1] bool."""
        T = self.seq_len
        if self.mask is None:
            return self._windows(samples * T, T + 1).astype(np.int64), None
        samples = samples if self.rewards is None else np.stack([2 * samples, 2 * samples + 1], 1).reshape(-1)
        rows, masks = self.data.sequences(samples), self.mask.sequences(samples)
        for k, row in zip(samples, rows):
            if len(row) != T + 1:
                raise DataError(f"{self.data.idx_path}: sequence {k} holds {len(row)} tokens; a packed source "
                                f"needs seq_len + 1 = {T + 1}")
        return np.stack(rows).astype(np.int64), np.stack(masks) != 0

    def _keep(self, n: int, chunk: int = 1 << 22):
        """min_doc_tokens: the documents of at least n tokens, as (where each starts in the .bin, where each
        starts in the stream of them back to back and that stream's end), in tokens. A document runs from its
        first sequence's pointer to the next document's; the index is read `chunk` documents at a time."""
        d, kept = self.data, [np.empty((2, 0), np.int64)]
        for a in range(0, d.num_documents, chunk):
            seq = d.doc_indices(a, min(a + chunk, d.num_documents) + 1)  # first sequences of documents a, a+1, ...
            ptr = np.append(d.pointers(int(seq[0]), min(int(seq[-1]) + 1, len(d))), d.num_tokens * d.dtype.itemsize)
            bounds = ptr[seq - seq[0]] // d.dtype.itemsize  # where those documents start, and the last one ends
            kept.append(np.stack((bounds[:-1], bounds[1:]))[:, np.diff(bounds) >= n])
        kept = np.concatenate(kept, axis=1)
        if not kept.size:
            raise DataError(f"source {self.name!r}: min_doc_tokens = {n} keeps no document of {d.idx_path}")
        return kept[0], np.concatenate([[0], np.cumsum(kept[1] - kept[0])])

    def _windows(self, starts, count: int) -> np.ndarray:
        """[len(starts), count]: tokens [s, s + count) of the source's stream for each s (with min_doc_tokens,
        of its kept documents back to back: the pieces of the documents the window overlaps)."""
        if self.kept is None:
            return self.data.windows(starts, count)
        (at, begins), rows = self.kept, []
        for s in map(int, starts):  # documents i .. j-1 overlap [s, s + count)
            i, j = int(np.searchsorted(begins, s, "right")) - 1, int(np.searchsorted(begins, s + count))
            lo, hi = np.maximum(begins[i:j], s), np.minimum(begins[i + 1:j + 1], s + count)
            rows.append(np.concatenate([self.data.windows([a + l - b], h - l)[0]
                                        for a, b, l, h in zip(at[i:j], begins[i:j], lo, hi)]))
        return np.stack(rows)

    def _check_back_to_back(self, spots: int = 256) -> None:
        """A plain source reads its .bin as one stream: the first sequence at byte 0 and `spots` pairs of
        neighbours spread over the index must lie back to back (a writer that pads or aligns fails there).
        Every pointer would be a pass over the whole index, and a search per sample ~50 random page reads."""
        d, size = self.data, self.data.dtype.itemsize
        if len(d) and d.pointers(0, 1)[0] != 0:
            raise DataError(f"{d.idx_path}: the first sequence starts at byte {d.pointers(0, 1)[0]} of {d.bin_path}, "
                            f"not 0: a plain source reads its sequences back to back")
        for k in np.unique(np.linspace(0, len(d) - 2, min(spots, len(d) - 1), dtype=np.int64)) if len(d) > 1 else []:
            (p, q), n = d.pointers(k, k + 2), d.lengths(k, k + 1)[0]
            if q != p + int(n) * size:
                raise DataError(f"{d.idx_path}: sequences {k} and {k + 1} do not follow each other in {d.bin_path} "
                                f"(a gap or an overlap): a plain source reads its sequences back to back")

def blend_weights(weights: list[float]) -> list[float]:
    """A stage's weights as Megatron-LM hands them to helpers.cpp: normalize()d (w / sum(w) in float64,
    megatron/core/datasets/utils.py) twice, by BlendedMegatronDatasetBuilder.build (blended_megatron_dataset_builder.py)
    and again by BlendedDataset.__init__ (blended_dataset.py, a "redundant normalization for bitwise identical
    comparison"). The second division is not a no-op: it moves the last bit of some weights (6.4, 0.5, 7.4, 4.7
    among them), and with it the order of sources from sample 19 on, so once would not give Megatron's order."""
    for _ in range(2):
        w = np.array(weights, dtype=np.float64)
        weights = (w / np.sum(w)).tolist()
    return weights

def blend(weights: list[float], taken: list[int], first: int, count: int) -> tuple[list[int], list[int]]:
    """Samples first, ..., first + count - 1 of a blend, continuing from `taken` (how many samples each source gave
    before `first`; updated in place): the source of each sample and its place within that source. Megatron-LM's
    rule (helpers.cpp, build_blending_indices), in the same float64 operations: sample i goes to the source with
    the largest error weights[s] * max(i, 1) - taken[s], the first one on ties, so every prefix of the stream keeps
    close to the weights (which sum to 1: blend_weights). (A C++ build that fuses the multiply and subtract into
    one FMA, as GCC may on aarch64, can break a rare tie otherwise.) The counts at a given sample have a closed form
    for two sources (a rotation of the circle by the weight, up to rounding at ties), none known for more."""
    sources, places = [], []
    for i in range(first, first + count):
        x = max(float(i), 1.0)
        best, best_error = 0, weights[0] * x - taken[0]
        for s in range(1, len(weights)):
            error = weights[s] * x - taken[s]
            if error > best_error:
                best, best_error = s, error
        sources.append(best)
        places.append(taken[best])
        taken[best] += 1
    return sources, places

# ----------------------------------------------------------------------------- loading
@dataclass
class Batch:
    x: torch.Tensor                  # [m, T] int64, the inputs
    y: torch.Tensor                  # [m, T] int64, the targets (x shifted by one)
    loss_mask: torch.Tensor | None   # [m, T] bool, True where y counts (packed sources); None: everywhere
    source: torch.Tensor             # [m] int64, each row's source: an index into DataLoader.source_names
    sample: torch.Tensor | None = None     # [m] int64, each row's sample in its source (a pair: both its rows)
    rewards: torch.Tensor | None = None    # pairs: [m/2, 2 + n] float64, their rewards sequences NaN-padded
    ref_logps: torch.Tensor | None = None  # pairs: [m/2, 2] float64, from DataLoader.reference

class DataLoader:
    """Global batches of the blended sources, in an order that is a pure function of (seed, step, the stage table):
    DP rank r of dp takes the slice [r*G/dp, (r+1)*G/dp) of global batch `step` and cuts it into micro-batches, so
    the ranks together see what one process would, under any layout.

    stages: [(start step, [(name, prefix, weight), ...]), ...], the first at step 0 (see stage_table). Each stage is
    a fresh blend (`blend`, on its weights as blend_weights normalises them), as a new BlendedDataset would be. A
    sample is its source's next one: position k (the samples the source gave before it, in all stages) is the train
    sample source.train_samples(k). Those counts, the blend's cursor, have no cheap formula (`blend`): the loader
    carries them forward, and through a checkpoint (state / load_state); without one, get_batch(step) replays the
    blend from step 0, the same order at about 1 microsecond per sample (an hour for 3.7 billion samples).
    pairs: a sample is two adjacent rows (chosen, rejected) of one micro-batch (batch sizes count pairs), with its
    reference log-probabilities once train.py sets `reference`."""

    def __init__(self, stages: list, seq_len: int, global_batch: int, micro_batch: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, vocab_size: int | None = None, val_fraction: float = 0.01,
                 token_vocab: int | None = None, pairs: bool = False):
        assert 0 <= dp_rank < dp_size, (dp_rank, dp_size)
        if seq_len < 1:
            raise DataError(f"seq_len {seq_len} must be positive")
        if global_batch < 1 or micro_batch < 1 or global_batch % (dp_size * micro_batch):
            raise DataError(f"global_batch {global_batch} must divide by dp_size {dp_size} x micro_batch {micro_batch}")
        starts = [start for start, _ in stages]
        if not stages or starts[0] != 0 or starts != sorted(set(starts)) or not all(s for _, s in stages):
            raise DataError(f"stages must start at step 0, at increasing steps, each with sources: {starts}")
        prefixes = {}
        for _, sources in stages:
            for name, prefix, _, *least in sources:  # least: [min_doc_tokens] or []
                prefixes.setdefault(name, (prefix, *least))
        self.source_names = list(prefixes)  # in order of first appearance
        # the token dtype must hold the tokenizer's ids (token_vocab); the ids must be under the model's vocab_size
        self.sources = [Source(n, p, seq_len, val_fraction, token_vocab or vocab_size, *least)
                        for n, (p, *least) in prefixes.items()]
        for src in [s for s in self.sources if (s.rewards is not None) != pairs]:  # dpo and qrpo train on pairs alone
            raise DataError(f"{src.data.idx_path}: {'not ' * pairs}preference pairs (train.objective dpo, qrpo)")
        self.pairs, self.reference = pairs, None
        # (start step, the loader's index of each source, weights as Megatron normalises them)
        self.stages = [(start, [self.source_names.index(s[0]) for s in sources], blend_weights([s[2] for s in sources]))
                       for start, sources in stages]
        self.seq_len, self.global_batch, self.micro_batch = seq_len, global_batch, micro_batch
        self.dp_rank, self.dp_size, self.seed, self.vocab_size = dp_rank, dp_size, seed, vocab_size
        self.per_rank = global_batch // dp_size
        self._reset()

    # ---- the blend's cursor
    def _reset(self, *cursors):
        """A cursor is (step, stage, samples each of the stage's sources gave in it, samples each source gave
        in earlier stages); the loader remembers them by step: those at the stages' starts and the last few others."""
        self._known = {0: (0, 0, (0,) * len(self.stages[0][1]), (0,) * len(self.sources))}
        for cur in cursors:
            self._remember(cur)

    def _remember(self, cur):
        self._known[cur[0]] = cur
        for step in sorted(set(self._known) - {start for start, _, _ in self.stages})[:-2]:
            del self._known[step]

    def _blend_step(self, cur):
        """Global batch cur[0]: each sample's source and position in it, and the cursor after it."""
        step, k, taken, base = cur
        start, members, weights = self.stages[k]
        taken, base = list(taken), np.array(base, dtype=np.int64)
        index, place = blend(weights, taken, (step - start) * self.global_batch, self.global_batch)
        source = np.array(members, dtype=np.int64)[index]
        position = base[source] + np.array(place, dtype=np.int64)
        if k + 1 < len(self.stages) and self.stages[k + 1][0] == step + 1:  # the next stage: a fresh blend
            base[members] += taken
            k, taken = k + 1, [0] * len(self.stages[k + 1][1])
        return source, position, (step + 1, k, tuple(taken), tuple(base.tolist()))

    def _cursor(self, step):
        cur = self._known[max(s for s in self._known if s <= step)]
        while cur[0] < step:
            cur = self._blend_step(cur)[2]
            self._remember(cur)
        return cur

    def _history(self, step):
        """What the cursor at `step` depends on: the global batch and the stages begun before `step`."""
        return {"global_batch": self.global_batch,
                "stages": [[start, [[self.source_names[m], w] for m, w in zip(members, weights)]]
                           for start, members, weights in self.stages if start < step]}

    def state(self, step: int) -> dict:
        """The cursor at the start of global batch `step`, as a small JSON-able dict for a checkpoint."""
        _, k, taken, base = self._cursor(step)
        members, samples = self.stages[k][1], np.array(base, dtype=np.int64)
        samples[members] += taken
        return {"step": step, **self._history(step), "samples": dict(zip(self.source_names, samples.tolist())),
                "stage_samples": {self.source_names[m]: t for m, t in zip(members, taken)}}

    def load_state(self, state: dict) -> bool:
        """Continue from a cursor that state() made. It is a cache of what the stage table implies: one made with
        another global batch or other stages before its step is ignored (returns False) and the cursor recomputed."""
        step = state["step"]
        if {k: state.get(k) for k in ("global_batch", "stages")} != self._history(step):
            return False
        k = bisect.bisect_right([s[0] for s in self.stages], step) - 1
        start, members, _ = self.stages[k]
        base = np.array([state["samples"].get(name, 0) for name in self.source_names], dtype=np.int64)
        taken = [state["stage_samples"].get(self.source_names[m], 0) if start < step else 0 for m in members]
        base[members] -= taken
        base = tuple(base.tolist())
        self._reset((start, k, (0,) * len(members), base), (step, k, tuple(taken), base))
        return True

    def tokens_seen(self, step: int) -> dict:
        """{source name: tokens of its samples in global batches 0 ... step-1} (T per row, the targets)."""
        return {name: n * self.seq_len * (1 + self.pairs) for name, n in self.state(step)["samples"].items()}

    def stage_weights(self, step: int) -> dict:
        """{source name: normalised weight} of the stage that global batch `step` belongs to."""
        _, members, weights = self.stages[bisect.bisect_right([s[0] for s in self.stages], step) - 1]
        return {self.source_names[m]: w for m, w in zip(members, weights)}

    def samples(self, step: int) -> dict:
        """{source name: its sample indices (Source.read's k)} in global batch `step`, every rank's: a batch's name."""
        source, position, _ = self._blend_step(self._cursor(step))
        return {self.source_names[s]: self.sources[s].train_samples(position[source == s], self.seed).tolist()
                for s in np.unique(source)}

    # ---- batches
    def get_batch(self, step: int) -> list[Batch]:
        """This DP rank's micro-batches of global batch `step`."""
        source, position, after = self._blend_step(self._cursor(step))
        self._remember(after)
        part = slice(self.dp_rank * self.per_rank, (self.dp_rank + 1) * self.per_rank)
        source, position = source[part], position[part]
        rows, masks = np.empty((self.per_rank * (1 + self.pairs), self.seq_len + 1), np.int64), None
        sample = np.empty(self.per_rank, np.int64)
        for s in np.unique(source):
            at = source == s
            sample[at] = self.sources[s].train_samples(position[at], self.seed)
            read, mask = self._read(s, sample[at])
            rows[np.repeat(at, 1 + self.pairs)] = read  # a pair's two rows side by side
            if mask is not None:
                masks = np.ones(rows.shape, bool) if masks is None else masks
                masks[np.repeat(at, 1 + self.pairs)] = mask
        return self._micro_batches(rows, masks, source, sample)

    def val_batches(self, source: int, i: int) -> list[Batch]:
        """This DP rank's micro-batches of validation batch i of one source: its held-out samples in
        order (global batch i holds samples i*G ... i*G + G-1, modulo their number)."""
        src = self.sources[source]
        j = i * self.global_batch + self.dp_rank * self.per_rank + np.arange(self.per_rank)
        sample = src.num_train + j % src.num_val
        return self._micro_batches(*self._read(source, sample), np.full(self.per_rank, source), sample)

    def _read(self, s, samples):
        rows, masks = self.sources[s].read(samples)
        path, top, low = self.sources[s].data.bin_path, rows.max(initial=0), rows.min(initial=0)
        if self.vocab_size is not None and top >= self.vocab_size:
            raise DataError(f"{path}: holds token id {top} >= vocab_size {self.vocab_size} "
                            f"(wrong tokenizer for this model?)")
        if low < 0:
            raise DataError(f"{path}: holds a negative token id {low}")
        return rows, masks

    def _micro_batches(self, rows, masks, source, sample):
        r = 1 + self.pairs  # rows per sample
        rows, masks = torch.from_numpy(rows), None if masks is None else torch.from_numpy(masks[:, 1:])  # y's mask
        source, sample = (torch.from_numpy(np.repeat(np.asarray(a, dtype=np.int64), r)) for a in (source, sample))
        pairs, rewards, ref = list(zip(source[::2].tolist(), sample[::2].tolist())) if self.pairs else [], None, None
        if pairs:
            seqs = [self.sources[s].rewards.sequence(k).astype(np.float64) for s, k in pairs]
            rewards = torch.tensor(np.array([np.pad(q, (0, max(map(len, seqs)) - len(q)), constant_values=np.nan)
                                             for q in seqs]))
        if pairs and self.reference is not None:
            ref = torch.tensor(np.array([self.reference[s][k] for s, k in pairs]))
            if ref.isnan().any():  # computed before step 1, for the max_steps and eval_batches of then
                raise DataError("a pair has no reference log-probability: a run longer than begun needs a new out_dir")
        m = self.micro_batch * r
        return [Batch(rows[a:a + m, :-1].contiguous(), rows[a:a + m, 1:].contiguous(),
                      None if masks is None else masks[a:a + m].contiguous(), source[a:a + m].clone(),
                      sample[a:a + m].clone(), None if rewards is None else rewards[a // r:(a + m) // r],
                      None if ref is None else ref[a // r:(a + m) // r]) for a in range(0, len(rows), m)]

if __name__ == "__main__":
    raise SystemExit("data.py makes no datasets: python prepare.py INPUTS --out PREFIX (see prepare.py)")
