r"""
Tokens for nanoapertus: the tokenizer, the shard files on disk, `prepare` (text -> shards), the demo
corpus, and the DataLoader that hands each data-parallel rank its micro-batches.

    python data.py prepare corpus/ extra.jsonl --out data/mine                      # byte tokenizer
    python data.py prepare corpus/ --out data/mine-tekken --tokenizer path/to/tekken_240718.json
    python data.py demo                     # prepare the demo corpus once, print its directory

A dataset directory holds meta.json and the shards train_000000.bin, train_000001.bin, ...,
val_000000.bin, ... Every document is stored as [BOS] + tokens + [EOS] (Apertus wraps every document
in <s> ... </s>); a split is its shards concatenated in name order. One shard file, little endian:

    | offset | bytes        | field                                           |
    |--------|--------------|-------------------------------------------------|
    | 0      | 8            | magic b"NAPTOKS\0"                              |
    | 8      | 4            | version, uint32 = 1                             |
    | 12     | 4            | itemsize, uint32: 2 (uint16 ids) or 4 (uint32)  |
    | 16     | 8            | token count N, uint64                           |
    | 24     | 8            | reserved, zero                                  |
    | 32     | N * itemsize | the token ids                                   |
"""
import argparse
import base64
import bisect
import contextlib
import datetime
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import tiktoken
import torch
from tqdm import tqdm


@dataclass
class DataConfig:
    dataset: str = ""        # directory of prepared shards; "" = the built-in demo corpus (prepared once, cached)
    tokenizer: str = "byte"  # "byte" or the path of a Mistral tekken JSON (e.g. tekken_240718.json)
    seq_len: int = 256       # tokens per training sequence
    eval_batches: int = 4    # global batches in one validation pass


class DataError(Exception):
    """A problem with the user's data or settings; the message is one line and names the file."""


BOS_ID, EOS_ID, PAD_ID = 1, 2, 3  # <s>, </s>, <pad> in every tokenizer here; id 0 is <unk>

# -----------------------------------------------------------------------------
# tokenizer


class Tokenizer:
    """A tiktoken byte-level BPE whose ranks sit above `offset` reserved special ids: id = rank + offset.
    `special` names the special ids ({"<s>": 1, "<|user_start|>": 65, ...}); no text ever encodes to one."""

    def __init__(self, name: str, enc: tiktoken.Encoding, offset: int, vocab_size: int, special: dict[str, int]):
        self.name, self.enc, self.offset, self.vocab_size, self.special = name, enc, offset, vocab_size, special
        self.bos_id, self.eos_id, self.pad_id = special["<s>"], special["</s>"], PAD_ID

    def encode(self, text: str) -> list[int]:
        # encode_ordinary: a "<s>" inside the text is just text, never a special token
        return [rank + self.offset for rank in self.enc.encode_ordinary(text)]

    def encode_document(self, text: str) -> list[int]:
        return [self.bos_id] + self.encode(text) + [self.eos_id]

    def decode(self, ids) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        # special ids have no bytes, nor do ids past the ranks (a model's vocab is often padded, 260 -> 272)
        ranks = [i - self.offset for i in ids if self.offset <= i < self.offset + self.enc.n_vocab]
        return self.enc.decode_bytes(ranks).decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=None)  # parsing takes 0.5 s (tekken) to 1.5 s (tokenizer.json); prepare asks once a piece
def get_tokenizer(name: str) -> Tokenizer:
    """The tokenizer named "byte" (ids 0-3 special, bytes at 4..259), in a Mistral tekken JSON file, or in a
    Hugging Face tokenizer.json of a byte-level BPE (Apertus' released tokenizer) or a directory holding one."""
    if name == "byte":
        # no merges, so the split pattern changes only the speed, never the ids
        ranks = {bytes([b]): b for b in range(256)}
        enc = tiktoken.Encoding("byte", pat_str=r"\s+|\S+", mergeable_ranks=ranks, special_tokens={})
        return Tokenizer("byte", enc, offset=4, vocab_size=260, special={"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3})
    path = os.path.join(name, "tokenizer.json") if os.path.isdir(name) else name
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        if isinstance(spec, dict) and "model" in spec:
            return _read_tokenizer_json(path, spec)
        config = spec["config"]
        offset, vocab_size = config["default_num_special_tokens"], config["default_vocab_size"]
        # Apertus / Mistral-NeMo: 1000 special ids, then the first 130072 BPE ranks (the file holds 150000)
        ranks = {base64.b64decode(t["token_bytes"]): t["rank"] for t in spec["vocab"][: vocab_size - offset]}
        # newer tekken files list their special tokens; v3 (tekken_240718.json) names none, and mistral-common
        # gives ids 0-2 these names (Apertus renamed some of the others: its tokenizer.json has them all)
        special = {str(t["token_str"]): t["rank"] for t in spec.get("special_tokens", [])}
        special = special or {"<unk>": 0, "<s>": 1, "</s>": 2}
        stem = os.path.splitext(os.path.basename(path))[0]
        enc = tiktoken.Encoding(stem, pat_str=config["pattern"], mergeable_ranks=ranks, special_tokens={})
        return Tokenizer(stem, enc, offset, vocab_size, special)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: tokenizer must be 'byte', a tekken JSON file or a tokenizer.json "
                        f"({type(e).__name__}: {e})") from None


def _gpt2_byte_spelling() -> dict[int, str]:
    """The character that spells each byte in a byte-level tokenizer.json (bytes_to_unicode in openai/gpt-2's
    encoder.py): printable Latin-1 bytes spell themselves, the other 68 take U+0100... in byte order
    (space -> 'Ġ', newline -> 'Ċ'), so that every token is a printable string."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(0x100 + k) for k, b in enumerate(others)}}


def _read_tokenizer_json(path: str, spec: dict) -> Tokenizer:
    """A Hugging Face tokenizer.json laid out as Mistral's and Apertus' are: the special tokens (added_tokens) at
    ids 0..offset-1, then the byte-level BPE tokens in merge-priority order (Apertus: ids 1000.. are the tekken
    ranks, id = rank + 1000). tiktoken then computes the ids that the tokenizers library computes from the file:
    both cut text with the same regex, look a whole piece up first (the file's ignore_merges; every Apertus
    token is also reachable by merges, so either value gives the same ids), then merge the adjacent pair that
    comes first in the merge list, which here is the pair whose result has the lowest id."""
    # a tokenizer.json is named for its directory (".../Apertus-8B-Instruct-2509/tokenizer.json")
    name = os.path.splitext(os.path.basename(path))[0]
    name = os.path.basename(os.path.dirname(os.path.abspath(path))) if name == "tokenizer" else name
    try:
        model, pre, added = spec["model"], spec["pre_tokenizer"], spec["added_tokens"]
        if model["type"] != "BPE":
            raise DataError(f"{path}: the model is {model['type']}, not a byte-level BPE")
        if (spec.get("normalizer") or model.get("dropout") or model.get("continuing_subword_prefix")
                or model.get("end_of_word_suffix")):
            raise DataError(f"{path}: a normalizer, BPE dropout or subword affixes are not supported (Apertus has "
                            f"none)")
        # Split cuts the text into pieces with a regex, then ByteLevel only respells each piece's bytes (use_regex
        # false: no second, GPT-2 style split). "Isolated" keeps every match as a piece, as tiktoken does;
        # tiktoken drops text that no match covers, which the tekken pattern never leaves (\s+ and
        # [^\s\p{L}\p{N}]+ catch whatever the letter and digit alternatives do not)
        steps = pre["pretokenizers"] if pre["type"] == "Sequence" else [pre]
        if ([s["type"] for s in steps] != ["Split", "ByteLevel"] or "Regex" not in steps[0]["pattern"]
                or steps[0]["behavior"] != "Isolated" or steps[0]["invert"]
                or steps[1].get("use_regex", True) or steps[1].get("add_prefix_space")):
            raise DataError(f"{path}: pre_tokenizer must be Sequence[Split(Regex, Isolated), ByteLevel(use_regex="
                            f"false)] as in Apertus' tokenizer.json")
        # the regex is Oniguruma syntax in the file and fancy-regex syntax in tiktoken: the same for this pattern
        pattern = steps[0]["pattern"]["Regex"]

        special = {t["content"]: t["id"] for t in added}
        if not all(t["special"] for t in added):  # transformers finds non-special added tokens inside text
            raise DataError(f"{path}: added tokens that are not special are not supported")
        if "<s>" not in special or "</s>" not in special:
            raise DataError(f"{path}: no <s> or </s> among the added_tokens")
        byte_of = {c: b for b, c in _gpt2_byte_spelling().items()}
        ids = {}  # token bytes -> id, for the BPE tokens (the vocab also holds the special tokens)
        for spelling, i in model["vocab"].items():
            if special.get(spelling) == i:
                continue
            if not all(c in byte_of for c in spelling):
                raise DataError(f"{path}: vocab entry {spelling!r} (id {i}) is not in the byte-level spelling")
            ids[bytes(byte_of[c] for c in spelling)] = i
        offset, vocab_size = len(special), len(special) + len(ids)
        if sorted(special.values()) != list(range(offset)) or sorted(ids.values()) != list(range(offset, vocab_size)):
            raise DataError(f"{path}: ids must be the special tokens 0..N-1, then the BPE tokens N, N+1, ... "
                            f"(Apertus: 1000 special ids)")
        if any(bytes([b]) not in ids for b in range(256)):
            raise DataError(f"{path}: the vocab lacks some of the 256 single bytes; not a byte-level BPE")
        # tiktoken merges by token id alone, so the merge list must follow the id order: checked here (every
        # part and result a token, results in id order, every multi-byte token some merge's result), ~0.2 s.
        # Not checked, as it takes seconds: that the list holds every split of a token into two tokens, as
        # lists converted from tiktoken or tekken (Apertus') do.
        vocab, last, made = model["vocab"], offset, set()
        for merge in model["merges"]:
            left, right = merge.split(" ") if isinstance(merge, str) else merge  # older files write "a b"
            i = vocab[left + right]
            if i < last or left not in vocab or right not in vocab:
                raise DataError(f"{path}: merge {left!r} + {right!r} (id {i}) is out of the id order; tiktoken "
                                f"cannot reproduce this BPE")
            last = i
            made.add(i)
        if len(made) != sum(len(b) > 1 for b in ids):
            raise DataError(f"{path}: {sum(len(b) > 1 for b in ids) - len(made)} multi-byte tokens are made by no "
                            f"merge")
        ranks = {b: i - offset for b, i in ids.items()}
        enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{path}: not a byte-level BPE tokenizer.json ({type(e).__name__}: {e})") from None
    return Tokenizer(name, enc, offset, vocab_size, special)


# -----------------------------------------------------------------------------
# chat: the Apertus chat template, for supervised fine-tuning

# the "Current date" of the default system prompt. The Instruct models' template writes today's date there
# (strftime_now); a fixed default keeps prepared data the same on every day. 2025-09-02: Apertus' release.
CHAT_DATE = "2025-09-02"
DEFAULT_SYSTEM = ("You are Apertus, a helpful assistant created by the SwissAI initiative.\n"
                  "Knowledge cutoff: 2024-04\nCurrent date: {date}")
DEVELOPER = "Deliberation: disabled\nTool Capabilities: disabled"  # the developer block, thinking and tools off
CHAT_CONTROL = [f"<|{role}_{edge}|>" for role in ("system", "developer", "user", "assistant")
                for edge in ("start", "end")]


def chat_tokens(tok: Tokenizer, messages, date: str = CHAT_DATE) -> tuple[list[int], list[bool]]:
    """A conversation [{"role": "system" | "user" | "assistant", "content": str}, ...] as Apertus-Instruct sees it:

        <s><|system_start|>{system}<|system_end|><|developer_start|>Deliberation: disabled
        Tool Capabilities: disabled<|developer_end|><|user_start|>{user}<|user_end|>
        <|assistant_start|>{assistant}<|assistant_end|><|user_start|>{user}<|user_end|><|assistant_start|>...

    one string, with a newline after "disabled" and nowhere else; each control token one id, each content
    encoded as ordinary text (a "<|user_start|>" typed by a user stays text), nothing in between. Without a
    system message comes the default one, dated `date` (YYYY-MM-DD). Returns (ids, loss_mask): loss_mask[i] is
    True where ids[i] is a target the loss counts, exactly the tokens of the assistant contents and each
    <|assistant_end|> (predicting it teaches the model to stop).

    This is the chat template of the Apertus Instruct models (swiss-ai/Apertus-8B-Instruct-2509; the same Jinja
    is in github.com/swiss-ai/apertus_format, src/templates/chat_template.jinja) with tools and deliberation off,
    but for two things. The template closes an assistant turn only when a user turn follows, so that a prompt
    ends open; here the last assistant turn gets its <|assistant_end|> too. And the template renders turns in
    any order (two assistant messages in a row become one turn); here they must alternate, user first and
    assistant last, else a DataError says what is wrong.
    """
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise DataError('a conversation must be a non-empty list of {"role": ..., "content": ...} objects')
    for k, m in enumerate(messages):
        if m.get("role") not in ("system", "user", "assistant"):
            raise DataError(f"message {k}: role {m.get('role')!r} is not system, user or assistant")
        if not isinstance(m.get("content"), str):
            raise DataError(f"message {k}: content must be a string, not {type(m.get('content')).__name__}")
    first = 1 if messages[0]["role"] == "system" else 0
    for k in range(first, len(messages)):
        role, want = messages[k]["role"], ("user", "assistant")[(k - first) % 2]
        if role != want:
            raise DataError(f"message {k}: expected role {want!r}, got {role!r} (after an optional system message, "
                            f"user and assistant messages alternate)")
    if messages[-1]["role"] != "assistant":
        raise DataError("a conversation must end with an assistant message (the loss is on the assistant's words)")
    try:
        if datetime.date.fromisoformat(date).isoformat() != date:  # Python 3.11 also reads "20250902"
            raise ValueError
    except (TypeError, ValueError):
        raise DataError(f"date {date!r} must be a YYYY-MM-DD string") from None
    missing = [name for name in CHAT_CONTROL if name not in tok.special]
    if missing:
        raise DataError(f"tokenizer {tok.name} has no {missing[0]} token; chat data needs Apertus' tokenizer.json")
    c = tok.special
    system = messages[0]["content"] if first else DEFAULT_SYSTEM.format(date=date)
    pieces = [([tok.bos_id, c["<|system_start|>"]], False), (tok.encode(system), False),
              ([c["<|system_end|>"], c["<|developer_start|>"]], False), (tok.encode(DEVELOPER), False),
              ([c["<|developer_end|>"]], False)]
    for m in messages[first:]:
        if m["role"] == "user":
            pieces += [([c["<|user_start|>"]], False), (tok.encode(m["content"]), False), ([c["<|user_end|>"]], False)]
        else:
            pieces += [([c["<|assistant_start|>"]], False), (tok.encode(m["content"]) + [c["<|assistant_end|>"]], True)]
    ids = [i for piece, _ in pieces for i in piece]
    loss_mask = [learn for piece, learn in pieces for _ in piece]
    return ids, loss_mask


# -----------------------------------------------------------------------------
# shard files (layout in the docstring at the top)

MAGIC, VERSION = b"NAPTOKS\0", 1
HEADER = struct.Struct("<8sIIQ8x")  # magic, version, itemsize, token count, 8 reserved bytes = 32 bytes


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2" if vocab_size <= 2**16 else "<u4")


def write_shard(path: str, tokens: np.ndarray) -> None:
    """Write a whole shard at once (prepare streams instead, see _ShardWriter); tokens are uint16 or uint32."""
    tokens = np.ascontiguousarray(tokens, dtype=tokens.dtype.newbyteorder("<"))
    assert tokens.dtype.itemsize in (2, 4) and tokens.dtype.kind == "u", tokens.dtype
    with open(path, "wb") as f:
        f.write(HEADER.pack(MAGIC, VERSION, tokens.dtype.itemsize, tokens.size))
        f.write(tokens.tobytes())


def read_shard(path) -> np.ndarray:
    """The tokens of one shard, memory-mapped (never read whole), after checking the header against the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
    except OSError as e:
        raise DataError(f"{path}: cannot read shard ({e.strerror})") from None
    if len(head) < HEADER.size or head[:8] != MAGIC:
        raise DataError(f"{path}: not a token shard (no {MAGIC!r} header); run `python data.py prepare`")
    _, version, itemsize, count = HEADER.unpack(head)
    if version != VERSION or itemsize not in (2, 4):
        raise DataError(f"{path}: corrupt shard header (version {version}, itemsize {itemsize})")
    held = (size - HEADER.size) // itemsize
    if held != count or (size - HEADER.size) % itemsize:
        what = "truncated" if held < count else "corrupt"
        raise DataError(f"{path}: {what} shard: header says {count} tokens, file holds {held}")
    if count == 0:  # np.memmap refuses an empty map
        return np.empty(0, dtype=f"<u{itemsize}")
    return np.memmap(path, dtype=f"<u{itemsize}", mode="r", offset=HEADER.size, shape=(count,))


class _ShardWriter:
    """Streams tokens into {split}_000000.bin, {split}_000001.bin, ..., a new file every shard_tokens."""

    def __init__(self, out_dir: str, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.f, self.shards, self.in_shard, self.tokens, self.documents = None, 0, 0, 0, 0

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            if self.f is None:
                self.f = open(os.path.join(self.out_dir, f"{self.split}_{self.shards:06d}.bin"), "wb")
                self.f.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, 0))  # count patched in _close
            take = min(tokens.size, self.shard_tokens - self.in_shard)
            self.f.write(tokens[:take].astype(self.dtype, copy=False).tobytes())
            tokens, self.in_shard, self.tokens = tokens[take:], self.in_shard + take, self.tokens + take
            if self.in_shard == self.shard_tokens:
                self._close()

    def _close(self) -> None:
        self.f.seek(0)
        self.f.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.in_shard))
        self.f.close()
        self.f, self.shards, self.in_shard = None, self.shards + 1, 0

    def finish(self) -> None:
        if self.f is None and self.shards == 0:  # an empty split still gets one (empty) shard
            self.f = open(os.path.join(self.out_dir, f"{self.split}_000000.bin"), "wb")
        if self.f is not None:
            self._close()


# -----------------------------------------------------------------------------
# prepare: text files, directories and .jsonl files -> shards

PIECE_BYTES = 4 << 20  # .jsonl files are cut at line ends into pieces this big, so one big file uses every worker


def _jsonl_pieces(path: str) -> list[tuple[int, int, int]]:
    """(start byte, end byte, line number of the first line) of each piece of a .jsonl file."""
    pieces, start, first_line, offset, lines = [], 0, 1, 0, 0
    with open(path, "rb") as f:
        while block := f.read(PIECE_BYTES):
            lines += block.count(b"\n")
            if (nl := block.rfind(b"\n")) >= 0:  # cut after the block's last line end
                pieces.append((start, offset + nl + 1, first_line))
                start, first_line = offset + nl + 1, lines + 1
            offset += len(block)
    return pieces + [(start, offset, first_line)] if start < offset else pieces


def _list_pieces(inputs: list[str]) -> list[tuple[str, str, int, int, int]]:
    """(path, key, start, end, first line) of every piece of work, in a fixed order (directories sorted).
    key names the file for the split hash: its path relative to the input's parent directory, so that
    the train/val split does not depend on the working directory or where the corpus is mounted."""
    pieces = []
    for inp in inputs:
        if not os.path.exists(inp):
            raise DataError(f"{inp}: no such file or directory")
        files = [inp]
        if os.path.isdir(inp):
            files = []
            for dirpath, dirnames, filenames in os.walk(inp):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # sorted: a fixed walk order
                files += [os.path.join(dirpath, n) for n in sorted(filenames) if not n.startswith(".")]
        base = os.path.dirname(os.path.abspath(inp))
        for path in files:
            key = os.path.relpath(os.path.abspath(path), base)
            try:
                if path.endswith(".jsonl"):
                    pieces += [(path, key, *piece) for piece in _jsonl_pieces(path)]
                else:
                    pieces.append((path, key, 0, os.path.getsize(path), 1))
            except OSError as e:
                raise DataError(f"{path}: cannot read input ({e.strerror})") from None
    return pieces


def _documents(path: str, raw: bytes, first_line: int):
    """(line, text) of every document in a piece: one per .jsonl line, else the whole file."""
    if not path.endswith(".jsonl"):
        yield 1, raw.decode("utf-8", errors="replace")
        return
    for line, data in enumerate(raw.split(b"\n"), first_line):
        if not data.strip():
            continue
        try:
            doc = json.loads(data.decode("utf-8", errors="replace"))
        except ValueError as e:
            raise DataError(f"{path}:{line}: not valid JSON ({e})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
            raise DataError(f'{path}:{line}: a .jsonl line must be an object with a string "text" field')
        yield line, doc["text"]


def _in_val(key: str, line: int, val_fraction: float) -> bool:
    # a stable hash (Python's hash() is salted per process) so that every run makes the same split
    digest = hashlib.blake2b(f"{key}:{line}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


def _tokenize_piece(task):
    """Tokenize one piece in a worker: (train tokens, length of its last document, #train docs, val tokens, #val)."""
    (path, key, start, end, first_line), tokenizer, val_fraction = task
    tok = get_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    try:
        with open(path, "rb") as f:
            f.seek(start)
            raw = f.read(end - start)
    except OSError as e:
        raise DataError(f"{path}: cannot read input ({e.strerror})") from None
    docs = {"train": [], "val": []}
    for line, text in _documents(path, raw, first_line):
        split = "val" if _in_val(key, line, val_fraction) else "train"
        docs[split].append(np.array(tok.encode_document(text), dtype=dtype))
    train, val = (np.concatenate(docs[s]) if docs[s] else np.empty(0, dtype) for s in ("train", "val"))
    last = len(docs["train"][-1]) if docs["train"] else 0
    return train, last, len(docs["train"]), val, len(docs["val"])


def prepare(inputs: list[str], out_dir: str, tokenizer: str = "byte", val_fraction: float = 0.01,
            workers: int = 0, shard_tokens: int = 2**28) -> None:
    """Tokenize text files, directories (walked recursively) and .jsonl files (one {"text": ...} per line)
    into out_dir. A document goes to val when a stable hash of (file, line) falls under val_fraction;
    the output is the same for any number of workers (0 = one per CPU core)."""
    tok = get_tokenizer(tokenizer)  # a bad tokenizer path fails before any work
    if not 0 <= val_fraction < 1 or shard_tokens < 1:
        raise DataError(f"val_fraction {val_fraction} must be in [0, 1) and shard_tokens {shard_tokens} positive")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise DataError(f"{out_dir}: already exists; remove it or choose another --out")
    pieces = _list_pieces(inputs)
    if not pieces:
        raise DataError(f"nothing to tokenize in {' '.join(inputs)}")
    workers = min(workers or os.cpu_count() or 1, len(pieces))
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    # build in a temporary directory and rename it at the end: an interrupted run leaves no half dataset
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a dataset is for everyone who may read its parent
    try:
        dtype = token_dtype(tok.vocab_size)
        out = {split: _ShardWriter(tmp, split, dtype, shard_tokens) for split in ("train", "val")}
        tasks = [(piece, tokenizer, val_fraction) for piece in pieces]
        bar = tqdm(total=sum(p[3] - p[2] for p in pieces), unit="B", unit_scale=True, desc="tokenizing")
        held = None  # the last train document, written one step late (see below)
        with multiprocessing.Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
            # imap (not imap_unordered): results arrive in piece order whatever the number of workers
            results = pool.imap(_tokenize_piece, tasks) if pool else map(_tokenize_piece, tasks)
            for piece, (train, last, n_train, val, n_val) in zip(pieces, results):
                if n_train:
                    if held is not None:
                        out["train"].write(held)
                    out["train"].write(train[:-last])
                    held = train[-last:]
                out["val"].write(val)
                out["train"].documents += n_train
                out["val"].documents += n_val
                bar.update(piece[3] - piece[2])
        bar.close()
        # the held document is the corpus's last train document, so writing it now keeps the order; it moves
        # to val only when no document hashed there, so that a small corpus still has something to validate on
        if held is not None:
            to_val = out["val"].documents == 0 and out["train"].documents >= 2
            out["val" if to_val else "train"].write(held)
            if to_val:
                out["train"].documents, out["val"].documents = out["train"].documents - 1, 1
        for writer in out.values():
            writer.finish()
        meta = {"format": "nanoapertus token shards, version 1", "tokenizer": tok.name,
                "vocab_size": tok.vocab_size, "dtype": dtype.name, "val_fraction": val_fraction,
                "inputs": list(inputs), **{k: {s: getattr(w, k) for s, w in out.items()}
                                            for k in ("tokens", "documents", "shards")}}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
        try:
            os.rename(tmp, out_dir)
        except OSError as e:
            raise DataError(f"{out_dir}: cannot move the prepared data into place ({e.strerror})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _stdlib_files(max_file_bytes: int = 200_000, max_total_bytes: int = 16 << 20) -> list[str]:
    """The standard library's .py sources in a fixed order: about 10 MB of text that every Python ships."""
    files, total = [], 0
    for dirpath, dirnames, filenames in os.walk(os.path.dirname(os.__file__)):
        # third-party packages are machine-dependent; the test suites are mostly fixtures
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")
                             and "test" not in d)
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            # _sysconfigdata is a generated dump of build paths; the biggest files are data tables, not code
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                size = os.path.getsize(path)
                if size <= max_file_bytes:
                    if total + size > max_total_bytes:
                        return files
                    files.append(path)
                    total += size
    return files


def demo_dataset(tokenizer: str = "byte") -> str:
    """The demo corpus (the stdlib's sources + pydoc's help topics), prepared once under
    $NANOAPERTUS_CACHE (default ~/.cache/nanoapertus); returns its directory."""
    import pydoc_data.topics

    cache = os.path.expanduser(os.environ.get("NANOAPERTUS_CACHE", "~/.cache/nanoapertus"))
    out_dir = os.path.join(cache, f"demo-{get_tokenizer(tokenizer).name}")
    if os.path.exists(os.path.join(out_dir, "meta.json")):
        return out_dir
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        # one .jsonl file, so that the split hash sees the same key ("python-stdlib.jsonl", line) on every run
        corpus = os.path.join(tmp, "python-stdlib.jsonl")
        with open(corpus, "w", encoding="utf-8") as f:
            for path in _stdlib_files():
                with open(path, encoding="utf-8", errors="replace") as src:
                    f.write(json.dumps({"text": src.read()}) + "\n")
            for topic in sorted(pydoc_data.topics.topics):
                f.write(json.dumps({"text": pydoc_data.topics.topics[topic]}) + "\n")
        try:
            prepare([corpus], out_dir, tokenizer)
        except DataError:
            if not os.path.exists(os.path.join(out_dir, "meta.json")):
                raise  # else another process (another torchrun rank, say) prepared it first
    return out_dir


# -----------------------------------------------------------------------------
# loading


class DataLoader:
    """Sequences of one split in an order that is a pure function of (seed, step, dp_rank, dp_size).

    The split's shards form one token stream; sequence i is stream[i*T : i*T + T + 1] (x = the first T,
    y = the last T: one token of overlap, as in Megatron-LM). Global batch `step` is the samples
    g = step*G ... step*G + G-1, sample g being sequence perm_epoch[g % n] of epoch g // n. DP rank r takes
    the contiguous slice [r*G/dp, (r+1)*G/dp) and cuts it into micro-batches, so the ranks together
    always see the same sequences as one process would, and resuming at `step` needs nothing else.
    """

    def __init__(self, path: str, split: str, seq_len: int, global_batch: int, micro_batch: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, vocab_size: int | None = None,
                 shuffle: bool = True):
        if not os.path.isdir(path):
            raise DataError(f"{path}: no such dataset directory; run `python data.py prepare INPUT --out {path}`")
        names = sorted(n for n in os.listdir(path) if n.startswith(f"{split}_") and n.endswith(".bin"))
        if not names:
            raise DataError(f"{path}: no {split}_*.bin shards; run `python data.py prepare INPUT --out {path}`")
        assert 0 <= dp_rank < dp_size, (dp_rank, dp_size)
        if seq_len < 1:
            raise DataError(f"seq_len {seq_len} must be positive")
        if global_batch < 1 or micro_batch < 1 or global_batch % (dp_size * micro_batch):
            raise DataError(f"global_batch {global_batch} must divide by dp_size {dp_size} x micro_batch {micro_batch}")
        self.shards = [s for s in (read_shard(os.path.join(path, n)) for n in names) if s.size]
        self.starts = np.cumsum([0] + [s.size for s in self.shards]).tolist()  # stream offset of each shard
        self.num_sequences = (self.starts[-1] - 1) // seq_len
        if self.num_sequences < 1:
            raise DataError(f"{path}: the {split} split holds {self.starts[-1]} tokens, too few for one "
                            f"sequence of seq_len {seq_len} (+1 for the targets)")
        self.path, self.split, self.seq_len, self.vocab_size = path, split, seq_len, vocab_size
        self.global_batch, self.micro_batch, self.dp_rank, self.dp_size = global_batch, micro_batch, dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self._perms = {}  # epoch -> permutation; at most 2, since a batch can straddle one epoch boundary

    def _sequence_index(self, g: int) -> int:
        epoch, i = divmod(g, self.num_sequences)
        if not self.shuffle:
            return i
        if epoch not in self._perms:
            if len(self._perms) == 2:
                del self._perms[min(self._perms)]
            # 8 bytes per sequence: fine up to ~1e9 sequences (4T tokens at T = 4096)
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)
        return int(self._perms[epoch][i])

    def _tokens(self, start: int, n: int) -> np.ndarray:
        """stream[start : start + n] as int64, gathered across shard boundaries."""
        out = np.empty(n, dtype=np.int64)
        k, done = bisect.bisect_right(self.starts, start) - 1, 0
        while done < n:
            lo = start + done - self.starts[k]
            take = min(n - done, self.shards[k].size - lo)
            out[done:done + take] = self.shards[k][lo:lo + take]
            done, k = done + take, k + 1
        return out

    def get_batch(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This DP rank's micro-batches of global batch `step`: [(x [micro, T] int64, y [micro, T] int64), ...]."""
        per_rank, T = self.global_batch // self.dp_size, self.seq_len
        first = step * self.global_batch + self.dp_rank * per_rank
        rows = np.stack([self._tokens(self._sequence_index(g) * T, T + 1) for g in range(first, first + per_rank)])
        if self.vocab_size is not None and rows.max() >= self.vocab_size:
            raise DataError(f"{self.path}: {self.split} data holds token id {rows.max()} >= vocab_size "
                            f"{self.vocab_size} (wrong tokenizer for this model?)")
        rows = torch.from_numpy(rows)  # [per_rank, T + 1]
        m = self.micro_batch
        return [(rows[k:k + m, :-1].contiguous(), rows[k:k + m, 1:].contiguous()) for k in range(0, per_rank, m)]


# -----------------------------------------------------------------------------
# command line


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Tokenize text into nanoapertus shards.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="text files, directories and .jsonl files -> shards")
    p.add_argument("inputs", nargs="+", help="text files, directories (recursive) and .jsonl files")
    p.add_argument("--out", required=True, help="the dataset directory to create")
    p.add_argument("--tokenizer", default="byte", help="'byte' or the path of a tekken JSON")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents for validation")
    p.add_argument("--workers", type=int, default=0, help="processes; 0 = one per CPU core")
    d = commands.add_parser("demo", help="prepare the demo corpus (once) and print its directory")
    d.add_argument("--tokenizer", default="byte", help="'byte' or the path of a tekken JSON")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            prepare(args.inputs, args.out, args.tokenizer, args.val_fraction, args.workers)
            with open(os.path.join(args.out, "meta.json")) as f:
                meta = json.load(f)
            print(f"{args.out}: {meta['tokens']} tokens, {meta['documents']} documents")
        else:
            print(demo_dataset(args.tokenizer))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
