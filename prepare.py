"""Making datasets for nanoapertus: the tokenizers, the Apertus chat template, text and conversations
turned into Megatron-LM's indexed dataset (data.py holds the format, its reader and its writer), the
demo corpus, and a benchmark of opening a huge index. Nothing here runs inside a training step; a
training run imports it only for the tokenizer of its sample and the demo corpus of `demo:` sources.

    python prepare.py corpus/ extra.jsonl --out data/mine                              # byte tokenizer
    python prepare.py corpus/ --out data/mine-tekken --tokenizer path/to/tekken_240718.json
    python prepare.py --chat chats.jsonl --tokenizer Apertus-8B-2509/ --out data/chats --seq-len 4096
    python prepare.py --preferences prefs.jsonl --tokenizer Apertus-8B-2509/ --out data/prefs --seq-len 4096
    python prepare.py demo                 # prepare the demo corpus once, print its path prefix
    python prepare.py bench-index --documents 100000000   # open a 100M-document index, time the first batch

Text: one sequence per document, [BOS] + tokens + [EOS] (Apertus wraps every document in <s> ... </s>),
uint16 ids when the vocabulary fits, else int32. Conversations: packed into sequences of exactly
--seq-len + 1 tokens with a loss mask beside them (PREFIX.mask.bin/.idx), see prepare_chat. Preference
pairs: two sequences each, with the mask beside them and their rewards beside that (PREFIX.rewards.bin/.idx,
float64), see prepare_preferences.
"""
import argparse
import base64
import contextlib
import datetime
import functools
import json
import math
import multiprocessing
import os
import resource
import sys
import tempfile
import time

import numpy as np
import tiktoken
from tqdm import tqdm

from data import DataError, DataLoader, IndexedDatasetWriter, write_index

def token_dtype(vocab_size: int) -> np.dtype:
    """The token type of a dataset written for a vocabulary of this size: 2 bytes where they suffice."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.int32)

# -----------------------------------------------------------------------------
# tokenizer

PAD_ID = 3  # <pad> in every tokenizer here (<s> 1, </s> 2, <unk> 0)

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

def check_chat_tokenizer(tok: Tokenizer) -> None:
    """The chat template needs a tokenizer with Apertus' control tokens (its tokenizer.json has them)."""
    missing = [name for name in CHAT_CONTROL if name not in tok.special]
    if missing:
        raise DataError(f"tokenizer {tok.name} has no {missing[0]} token; chat data needs Apertus' tokenizer.json")

def chat_tokens(tok: Tokenizer, messages, date: str = CHAT_DATE,
                generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
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
    assistant last, else a DataError says what is wrong. With generation_prompt, the conversation ends with
    a user message instead and the ids with <|assistant_start|>: what a model completes (chat.py), the
    prompt of a preference pair (prepare_preferences).
    """
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise DataError('a conversation must be a non-empty list of {"role": ..., "content": ...} objects')
    for k, m in enumerate(messages):
        if m.get("role") not in ("system", "user", "assistant"):
            raise DataError(f"message {k}: role {m.get('role')!r} is not system, user or assistant")
        if "content" not in m:
            raise DataError(f"message {k} has no content")
        if not isinstance(m.get("content"), str):
            raise DataError(f"message {k}: content must be a string, not {type(m.get('content')).__name__}")
    first = 1 if messages[0]["role"] == "system" else 0
    for k in range(first, len(messages)):
        role, want = messages[k]["role"], ("user", "assistant")[(k - first) % 2]
        if role != want:
            raise DataError(f"message {k}: expected role {want!r}, got {role!r} (after an optional system message, "
                            f"user and assistant messages alternate)")
    if messages[-1]["role"] != "assistant" and not generation_prompt:
        raise DataError("a conversation must end with an assistant message (the loss is on the assistant's words)")
    if messages[-1]["role"] != "user" and generation_prompt:
        raise DataError("a prompt must end with a user message (the model's answer comes next)")
    try:
        if datetime.date.fromisoformat(date).isoformat() != date:  # Python 3.11 also reads "20250902"
            raise ValueError
    except (TypeError, ValueError):
        raise DataError(f"date {date!r} must be a YYYY-MM-DD string") from None
    check_chat_tokenizer(tok)
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
    if generation_prompt:
        pieces.append(([c["<|assistant_start|>"]], False))
    ids = [i for piece, _ in pieces for i in piece]
    loss_mask = [learn for piece, learn in pieces for _ in piece]
    return ids, loss_mask

# -----------------------------------------------------------------------------
# preferences: pairs of completions of a prompt, for DPO and QRPO

def _reward(x, what):
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise DataError(f"{what} must be a finite number, got {x!r}")
    return float(x)

def preference_pair(tok: Tokenizer, record, date: str = CHAT_DATE):
    """One line of preferences, {"prompt": [messages...], "chosen": {"content": str, "reward": r},
    "rejected": {"content": str, "reward": r}, "ref_rewards": [r1, ..., rn]} (the rewards and ref_rewards
    are for QRPO; DPO needs none), as ([(ids, loss_mask) of prompt + chosen, of prompt + rejected],
    rewards: [R(chosen), R(rejected), r1, ..., rn] or []). Each completion is the assistant turn after the
    prompt in the chat template (chat_tokens: the prompt ends with <|assistant_start|>), and its mask
    covers its content and its <|assistant_end|> only: assistant turns inside the prompt are context."""
    if not isinstance(record, dict) or not {"prompt", "chosen", "rejected"} <= set(record):
        raise DataError('a preference record must be an object with "prompt", "chosen" and "rejected"')
    prompt, _ = chat_tokens(tok, record["prompt"], date, generation_prompt=True)
    pair, rewards = [], []
    for key in ("chosen", "rejected"):
        y = record[key]
        if not isinstance(y, dict) or not isinstance(y.get("content"), str):
            raise DataError(f'"{key}" must be an object with a string "content"')
        ids = tok.encode(y["content"]) + [tok.special["<|assistant_end|>"]]
        pair.append((prompt + ids, [False] * len(prompt) + [True] * len(ids)))
        if "reward" in y:
            rewards.append(_reward(y["reward"], f'"{key}": "reward"'))
    ref = record.get("ref_rewards")
    if ref is not None and (not isinstance(ref, list) or not ref):
        raise DataError('"ref_rewards" must be a non-empty list of numbers')
    if (len(rewards), ref is None) not in ((0, True), (2, False)):
        raise DataError('the rewards of "chosen" and "rejected" and "ref_rewards" come together (QRPO) or not at '
                        'all (DPO)')
    return pair, rewards + [_reward(r, f'"ref_rewards"[{i}]') for i, r in enumerate(ref or [])]

def _chat_input(path: str, out: str, tokenizer: str, seq_len: int):
    """What --chat and --preferences check before any work: a tokenizer with Apertus' control tokens (checked
    here, not at the first record: the file is not at fault), the sequence length, the output, the input.
    Returns (the tokenizer, the input's size in bytes)."""
    tok = get_tokenizer(tokenizer)
    check_chat_tokenizer(tok)
    if seq_len < 1:
        raise DataError(f"--seq-len {seq_len} must be positive")
    _check_out(out)
    try:
        return tok, os.path.getsize(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None

def _json_lines(path: str, size: int, desc: str):
    """(line number, its JSON value) for every non-blank line of a JSON-lines file, with a progress bar."""
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=desc) as bar:
        for line, raw in enumerate(f, 1):
            bar.update(len(raw))
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError as e:
                raise DataError(f"{path}:{line}: not valid JSON ({e})") from None
            yield line, record

def _add_padded(data_w, mask_w, ids, mask, n: int, eos_id: int) -> None:
    """One sequence of n tokens: ids padded with EOS, its loss mask with 0 (the padding comes last: under the
    causal mask no counted token sees it)."""
    data_w.add_document(np.array(ids + [eos_id] * (n - len(ids)), dtype=data_w.dtype))
    mask_w.add_document(np.array(mask + [False] * (n - len(ids)), dtype=np.uint8))

def prepare_preferences(path: str, out: str, tokenizer: str, seq_len: int, date: str = CHAT_DATE) -> dict:
    """Preference pairs (JSON lines, see preference_pair) -> out.bin/.idx: two sequences per pair, prompt +
    chosen then prompt + rejected, each padded to seq_len + 1 tokens; out.mask.bin/.idx their loss masks (1
    on the completion and its <|assistant_end|>, 0 elsewhere and on the padding); out.rewards.bin/.idx,
    float64, one sequence per pair: [R(chosen), R(rejected), r1, ..., rn], or empty when the file has no
    rewards (DPO). Every pair has rewards or none does. A pair whose longer sequence exceeds seq_len + 1
    tokens is dropped, never cut, and counted. Returns {"pairs", "dropped", "rewards", "tokens"}."""
    tok, size = _chat_input(path, out, tokenizer, seq_len)
    dtype, counts, first = token_dtype(tok.vocab_size), dict(pairs=0, dropped=0, rewards=False, tokens=0), None
    with IndexedDatasetWriter(out, dtype) as data_w, IndexedDatasetWriter(out + ".mask", np.uint8) as mask_w, \
            IndexedDatasetWriter(out + ".rewards", np.float64) as rewards_w:
        for line, record in _json_lines(path, size, "preferences"):
            try:
                pair, rewards = preference_pair(tok, record, date)
                if first is not None and bool(rewards) != bool(first[1]):
                    has = ("has", "has none") if rewards else ("has no", "has")
                    raise DataError(f"{has[0]} rewards, line {first[0]} {has[1]}: every pair has rewards (QRPO) or none "
                                    f"does (DPO)")
            except DataError as e:
                raise DataError(f"{path}:{line}: {e}") from None
            first = first or (line, rewards)
            if max(len(ids) for ids, _ in pair) > seq_len + 1:
                counts["dropped"] += 1
                continue
            for ids, mask in pair:
                _add_padded(data_w, mask_w, ids, mask, seq_len + 1, tok.eos_id)
                counts["tokens"] += len(ids)
            rewards_w.add_document(np.array(rewards, dtype=np.float64))
            counts["pairs"] += 1
        if not counts["pairs"]:
            raise DataError(f"{path}: no pair fits in seq_len {seq_len} + 1 tokens ({counts['dropped']} dropped)")
        counts["rewards"] = bool(first[1])
    return counts

# -----------------------------------------------------------------------------
# prepare: text files, directories and .jsonl files -> one indexed dataset

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

def _list_pieces(inputs: list[str]) -> list[tuple[str, int, int, int]]:
    """(path, start, end, first line) of every piece of work, in a fixed order (directories sorted)."""
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
        for path in files:
            try:
                if path.endswith(".jsonl"):
                    pieces += [(path, *piece) for piece in _jsonl_pieces(path)]
                else:
                    pieces.append((path, 0, os.path.getsize(path), 1))
            except OSError as e:
                raise DataError(f"{path}: cannot read input ({e.strerror})") from None
    return pieces

def _documents(path: str, raw: bytes, first_line: int):
    """The text of every document in a piece: one per .jsonl line, else the whole file."""
    if not path.endswith(".jsonl"):
        yield raw.decode("utf-8", errors="replace")
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
        yield doc["text"]

def _tokenize_piece(task):
    """Tokenize one piece in a worker: (its documents' tokens back to back, the length of each)."""
    (path, start, end, first_line), tokenizer = task
    tok = get_tokenizer(tokenizer)
    try:
        with open(path, "rb") as f:
            f.seek(start)
            raw = f.read(end - start)
    except OSError as e:
        raise DataError(f"{path}: cannot read input ({e.strerror})") from None
    dtype = token_dtype(tok.vocab_size)
    docs = [np.array(tok.encode_document(text), dtype=dtype) for text in _documents(path, raw, first_line)]
    return (np.concatenate(docs) if docs else np.empty(0, dtype)), [len(d) for d in docs]

def _check_out(out: str) -> None:
    """prepare never overwrites a dataset, nor leaves a stale loss mask or rewards beside a new one."""
    for path in (out + ext for ext in (".idx", ".bin", ".mask.idx", ".mask.bin", ".rewards.idx", ".rewards.bin")):
        if os.path.exists(path):
            raise DataError(f"{path}: already exists; remove it or choose another --out")

def prepare(inputs: list[str], out: str, tokenizer: str = "byte", workers: int = 0) -> dict:
    """Tokenize text files, directories (walked recursively) and .jsonl files (one {"text": ...} per line)
    into the dataset `out` (out.bin + out.idx), one sequence per document, in input order; the output is
    the same for any number of workers (0 = one per CPU core). Returns {"tokens": ..., "documents": ...}."""
    tok = get_tokenizer(tokenizer)  # a bad tokenizer path fails before any work
    _check_out(out)
    pieces = _list_pieces(inputs)
    if not pieces:
        raise DataError(f"nothing to tokenize in {' '.join(inputs)}")
    workers = min(workers or os.cpu_count() or 1, len(pieces))
    bar = tqdm(total=sum(p[2] - p[1] for p in pieces), unit="B", unit_scale=True, desc="tokenizing")
    with IndexedDatasetWriter(out, token_dtype(tok.vocab_size)) as writer, \
            multiprocessing.Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        tasks = [(piece, tokenizer) for piece in pieces]
        # imap (not imap_unordered): results arrive in piece order whatever the number of workers
        for piece, (tokens, lengths) in zip(pieces, pool.imap(_tokenize_piece, tasks) if pool else
                                            map(_tokenize_piece, tasks)):
            writer.add_documents(tokens, lengths)
            bar.update(piece[2] - piece[1])
    bar.close()
    return {"tokens": writer.num_tokens, "documents": writer.sequences}

def prepare_chat(path: str, out: str, tokenizer: str, seq_len: int, date: str = CHAT_DATE) -> dict:
    """Conversations (JSON lines {"messages": [{"role": ..., "content": ...}, ...]}) -> a packed, masked
    dataset: out.bin/.idx holds sequences of exactly seq_len + 1 tokens, each a run of whole
    conversations (chat_tokens; every one starts with <s>, where document masking and positions
    restart) padded at the end, and out.mask.bin/.idx their loss masks (1 on the assistant's contents
    and each <|assistant_end|>, 0 elsewhere and on the padding). Packing is greedy, in file order; a
    conversation longer than seq_len + 1 tokens is dropped, never cut, and counted.
    Returns {"conversations", "packed", "dropped", "sequences", "tokens"}."""
    tok, size = _chat_input(path, out, tokenizer, seq_len)
    n = seq_len + 1
    dtype = token_dtype(tok.vocab_size)
    counts = dict(conversations=0, packed=0, dropped=0, sequences=0, tokens=0)
    ids, mask = [], []  # the pack being filled

    def flush(data_w, mask_w):
        _add_padded(data_w, mask_w, ids, mask, n, tok.eos_id)
        counts["sequences"] += 1
        counts["tokens"] += len(ids)
        ids.clear(), mask.clear()

    with IndexedDatasetWriter(out, dtype) as data_w, IndexedDatasetWriter(out + ".mask", np.uint8) as mask_w:
        for line, record in _json_lines(path, size, "conversations"):
            if not isinstance(record, dict) or "messages" not in record:
                raise DataError(f'{path}:{line}: a chat record must be an object with a "messages" list')
            try:
                c_ids, c_mask = chat_tokens(tok, record["messages"], date)
            except DataError as e:
                raise DataError(f"{path}:{line}: {e}") from None
            counts["conversations"] += 1
            if len(c_ids) > n:
                counts["dropped"] += 1
                continue
            if len(ids) + len(c_ids) > n:
                flush(data_w, mask_w)
            ids += c_ids
            mask += c_mask
            counts["packed"] += 1
        if ids:
            flush(data_w, mask_w)
        if not counts["sequences"]:
            raise DataError(f"{path}: no conversation fits in seq_len {seq_len} + 1 tokens "
                            f"({counts['dropped']} dropped)")
    return counts

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

DEMO_SOURCES = ("all", "code", "docs")

def demo_dataset(tokenizer: str = "byte", kind: str = "all") -> str:
    """A demo corpus made from what every Python installation ships (no download): "code", the standard
    library's sources, "docs", pydoc's help topics (English prose about Python), or "all", both.
    Prepared once under $NANOAPERTUS_CACHE (default ~/.cache/nanoapertus); returns its path prefix.
    In a config, the prefix "demo:code" (or demo:docs, demo:all) names it."""
    import pydoc_data.topics

    if kind not in DEMO_SOURCES:
        raise DataError(f"demo:{kind}: the demo sources are {', '.join('demo:' + k for k in DEMO_SOURCES)}")
    cache = os.path.expanduser(os.environ.get("NANOAPERTUS_CACHE", "~/.cache/nanoapertus"))
    name = get_tokenizer(tokenizer).name
    prefix = os.path.join(cache, f"demo-{name}" if kind == "all" else f"demo-{kind}-{name}")
    if os.path.exists(prefix + ".idx"):
        return prefix
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        corpus = os.path.join(tmp, "python-stdlib.jsonl")
        with open(corpus, "w", encoding="utf-8") as f:
            for path in _stdlib_files() if kind in ("all", "code") else []:
                with open(path, encoding="utf-8", errors="replace") as src:
                    f.write(json.dumps({"text": src.read()}) + "\n")
            for topic in sorted(pydoc_data.topics.topics) if kind in ("all", "docs") else []:
                f.write(json.dumps({"text": pydoc_data.topics.topics[topic]}) + "\n")
        try:
            prepare([corpus], prefix, tokenizer)
        except DataError:
            if not os.path.exists(prefix + ".idx"):
                raise  # else another process (another torchrun rank, say) prepared it first
    return prefix

def resolve_prefix(prefix: str, tokenizer: str) -> str:
    """A source's path prefix, with "demo:<kind>" standing for a demo corpus (prepared on first use)."""
    return demo_dataset(tokenizer, prefix[5:]) if prefix.startswith("demo:") else prefix

# -----------------------------------------------------------------------------
# benchmark: a huge index opens in constant time and memory

def _write_synthetic_index(prefix: str, documents: int, doc_tokens: int, dtype, chunk: int = 1 << 22) -> None:
    """An index of `documents` documents of doc_tokens tokens each, written in full and then dropped from
    the page cache (as a dataset on disk would be), and a sparse .bin of the size it implies (one byte
    written at its end: the file system stores no zeros)."""
    def lengths():
        for a in range(0, documents, chunk):
            yield np.full(min(chunk, documents - a), doc_tokens, dtype="<i4")
    with open(prefix + ".idx", "wb") as f:
        write_index(f, dtype, documents, lengths, chunk)
        f.flush()
        os.fsync(f.fileno())
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    with open(prefix + ".bin", "wb") as f:
        f.seek(documents * doc_tokens * np.dtype(dtype).itemsize - 1)
        f.write(b"\0")

def _memory() -> dict:
    """This process's resident memory now and at its peak, in MB (Linux; elsewhere the peak only)."""
    try:
        with open("/proc/self/status") as f:
            status = dict(line.split(":", 1) for line in f)
        return {k: int(status[v].split()[0]) / 1024 for k, v in (("now", "VmRSS"), ("peak", "VmHWM"))}
    except OSError:
        return {"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

def bench_index(documents: int = 100_000_000, doc_tokens: int = 1000, seq_len: int = 4096,
                global_batch: int = 1024, vocab_size: int = 131072, workdir: str | None = None) -> dict:
    """Build a synthetic dataset of `documents` documents (in a child process, so that its buffers are
    not this process's memory), then time opening a DataLoader on it and producing global batch 0 (all
    of it, on one rank), and report this process's resident memory before and after."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        prefix = os.path.join(tmp, "synthetic")
        t0 = time.perf_counter()
        child = multiprocessing.Process(target=_write_synthetic_index,
                                        args=(prefix, documents, doc_tokens, token_dtype(vocab_size)))
        child.start()
        child.join()
        built = time.perf_counter() - t0
        before = _memory()
        t0 = time.perf_counter()
        loader = DataLoader([(0, [("synthetic", prefix, 1.0)])], seq_len, global_batch, global_batch,
                            vocab_size=vocab_size)
        batch = loader.get_batch(0)[0]
        seconds = time.perf_counter() - t0
        after = _memory()
        return {"documents": documents, "tokens": documents * doc_tokens, "idx_bytes": os.path.getsize(prefix + ".idx"),
                "train_samples": loader.sources[0].num_train, "batch": list(batch.x.shape), "build_seconds": built,
                "open_and_first_batch_seconds": seconds, "rss_mb_before": before.get("now"),
                "rss_mb_after": after.get("now"), "peak_rss_mb": after["peak"]}

# -----------------------------------------------------------------------------
# command line

def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in ("demo", "bench-index") else "prepare"
    parser = argparse.ArgumentParser(prog=f"prepare.py{'' if command == 'prepare' else ' ' + command}",
                                     description="Megatron-LM indexed datasets for nanoapertus.")
    if command == "prepare":
        parser.add_argument("inputs", nargs="*", help="text files, directories (recursive) and .jsonl files")
        parser.add_argument("--chat", metavar="JSONL", help='conversations ({"messages": [...]} per line) packed '
                            "into sequences of --seq-len tokens, with loss masks (PREFIX.mask.bin/.idx)")
        parser.add_argument("--preferences", metavar="JSONL", help='preference pairs ({"prompt": [...], "chosen": '
                            '{...}, "rejected": {...}, "ref_rewards": [...]} per line), two sequences each, with loss '
                            "masks and rewards (PREFIX.mask.bin/.idx, PREFIX.rewards.bin/.idx)")
        parser.add_argument("--seq-len", type=int, default=4096, help="with --chat or --preferences: the training "
                            "sequence length")
        parser.add_argument("--out", required=True, help="the path prefix of the dataset to create")
        parser.add_argument("--workers", type=int, default=0, help="processes; 0 = one per CPU core")
    if command != "bench-index":
        parser.add_argument("--tokenizer", default="byte",
                            help="'byte', a tekken JSON, or a Hugging Face tokenizer.json (or its directory)")
    else:
        parser.add_argument("--documents", type=int, default=100_000_000)
        parser.add_argument("--doc-tokens", type=int, default=1000)
        parser.add_argument("--seq-len", type=int, default=4096)
        parser.add_argument("--global-batch", type=int, default=1024)
        parser.add_argument("--dir", default=None, help="where to write the synthetic files (default: the temp dir)")
    args = parser.parse_args(argv if command == "prepare" else argv[1:])
    try:
        if command == "prepare" and args.chat and args.preferences:
            raise DataError("give --chat or --preferences, not both")
        if command == "prepare" and args.preferences:
            c = prepare_preferences(args.preferences, args.out, args.tokenizer, args.seq_len)
            print(f"{args.out}: {c['pairs']} pairs ({2 * c['pairs']} sequences, {c['tokens']} tokens, "
                  f"{'with' if c['rewards'] else 'without'} rewards); {c['dropped']} longer than {args.seq_len} + 1 "
                  f"tokens dropped")
        elif command == "prepare" and args.chat:
            c = prepare_chat(args.chat, args.out, args.tokenizer, args.seq_len)
            print(f"{args.out}: {c['packed']} of {c['conversations']} conversations in {c['sequences']} sequences of "
                  f"{args.seq_len} + 1 tokens ({c['tokens']} tokens); {c['dropped']} longer than that dropped")
        elif command == "prepare":
            if not args.inputs:
                raise DataError("prepare needs input files (or --chat JSONL, or --preferences JSONL)")
            counts = prepare(args.inputs, args.out, args.tokenizer, args.workers)
            print(f"{args.out}: {counts['tokens']} tokens, {counts['documents']} documents")
        elif command == "demo":
            print(demo_dataset(args.tokenizer))
        else:
            print(json.dumps(bench_index(args.documents, args.doc_tokens, args.seq_len, args.global_batch,
                                         workdir=args.dir), indent=2))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a directory that cannot be made or written (permission, full disk)
        print(f"error: {e.filename or getattr(args, 'out', '') or 'writing'}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0

if __name__ == "__main__":
    sys.exit(main())
