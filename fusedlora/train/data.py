"""Training data: records, tokenizers, packing or padding into fixed-length sequences, the held-out split.

A record is a (prompt, completion) pair of strings; a "text" record is ("", text). Tokens of the prompt
carry the label IGNORE, so the loss covers the completion (all of a "text" record) and its end-of-sequence
token. Sequences are [seq_len] rows of input_ids, labels and attention_mask:

- packed (default): the records' tokens follow one another and are cut every seq_len tokens; attention runs
  across record boundaries (each record starts with BOS, which is never a label). Only the last row is padded.
- padded: one record per row, cut at seq_len, padded on the right; padding has attention_mask 0, label IGNORE.

The order in which a run reads sequences is a pure function of (seed, sample index), so a run that resumes
at sample i reads what the uninterrupted run read there.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

import torch

IGNORE = -100
# The held-out split depends on the data only, so eval losses of runs with different seeds compare.
SPLIT_SEED = 0


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; then BOS, EOS and PAD."""

    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258
    vocab_size = 259

    def encode(self, text: str, bos: bool) -> list[int]:
        return ([self.bos_token_id] if bos else []) + list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A transformers tokenizer behind ByteTokenizer's interface."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_token_id = tok.eos_token_id
        self.bos_token_id = tok.bos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_token_id = pad if pad is not None else 0
        self.vocab_size = len(tok)

    def encode(self, text: str, bos: bool) -> list[int]:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        if bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids) -> str:
        return self.tok.decode(ids)


# ---------------------------------------------------------------------------------------------------------
# Records


def builtin_records(n: int = 3000, seed: int = 1234) -> list[tuple[str, str]]:
    """A small generated corpus with structure a tiny model can learn in a few hundred steps: sums, counting,
    a small grammar of sentences, and key/value lines."""
    rng = random.Random(seed)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    adjectives = ["red", "small", "quiet", "old", "bright", "green", "heavy", "quick", "cold", "round"]
    nouns = ["cat", "boat", "tree", "lamp", "river", "house", "bird", "stone", "clock", "garden"]
    verbs = ["sees", "follows", "paints", "finds", "carries", "watches", "passes", "builds"]
    places = ["near the hill", "by the sea", "in the town", "under the bridge", "at the market"]
    colors = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "sun": "yellow", "blood": "red"}
    records = []
    for _ in range(n):
        kind = rng.randrange(4)
        if kind == 0:
            a, b = rng.randrange(50), rng.randrange(50)
            text = f"{a} + {b} = {a + b}"
        elif kind == 1:
            start = rng.randrange(6)
            text = " ".join(words[start:start + rng.randrange(3, 5)])
        elif kind == 2:
            text = (f"the {rng.choice(adjectives)} {rng.choice(nouns)} {rng.choice(verbs)} "
                    f"the {rng.choice(adjectives)} {rng.choice(nouns)} {rng.choice(places)}.")
        else:
            thing = rng.choice(list(colors))
            text = f"the color of the {thing} is {colors[thing]}."
        records.append(("", text))
    return records


def load_jsonl(path: str) -> list[tuple[str, str]]:
    """Records from a JSONL file: each non-blank line {"text": str} or {"prompt": str, "completion": str}."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} line {lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path} line {lineno}: expected a JSON object, got {type(obj).__name__}")
            if "text" in obj:
                fields = ("text",)
            elif "prompt" in obj and "completion" in obj:
                fields = ("prompt", "completion")
            else:
                raise ValueError(f'{path} line {lineno}: expected a "text" field, or "prompt" and "completion" '
                                 f"fields; got keys {sorted(obj)}")
            for name in fields:
                if not isinstance(obj[name], str):
                    raise ValueError(f'{path} line {lineno}: "{name}" must be a string, got '
                                     f"{type(obj[name]).__name__}")
            records.append(("", obj["text"]) if fields == ("text",) else (obj["prompt"], obj["completion"]))
    if not records:
        raise ValueError(f"{path}: no records (expected JSON lines with \"text\" or \"prompt\"/\"completion\")")
    return records


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Tokens and sequences


def tokenize(record: tuple[str, str], tokenizer) -> tuple[list[int], list[int]]:
    """input ids and labels of one record: BOS + prompt (not labels) + completion + EOS (labels)."""
    prompt, completion = record
    head = tokenizer.encode(prompt, bos=True)
    tail = tokenizer.encode(completion, bos=False)
    if tokenizer.eos_token_id is not None:
        tail = tail + [tokenizer.eos_token_id]
    return head + tail, [IGNORE] * len(head) + tail


@dataclass
class Sequences:
    """Rows of equal length: input_ids, labels, attention_mask, each int64 [n, seq_len]."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index],
                "attention_mask": self.attention_mask[index]}


def build_sequences(records, tokenizer, seq_len: int, pack: bool) -> Sequences:
    pad = tokenizer.pad_token_id
    rows_ids, rows_labels, rows_mask = [], [], []

    def emit(ids, labels):
        n = len(ids)
        rows_ids.append(ids + [pad] * (seq_len - n))
        rows_labels.append(labels + [IGNORE] * (seq_len - n))
        rows_mask.append([1] * n + [0] * (seq_len - n))

    if pack:
        ids, labels = [], []
        for record in records:
            i, l = tokenize(record, tokenizer)
            ids += i
            labels += l
        for start in range(0, len(ids), seq_len):
            emit(ids[start:start + seq_len], labels[start:start + seq_len])
    else:
        for record in records:
            i, l = tokenize(record, tokenizer)
            emit(i[:seq_len], l[:seq_len])
    t = lambda rows: torch.tensor(rows, dtype=torch.int64).reshape(-1, seq_len)
    return Sequences(t(rows_ids), t(rows_labels), t(rows_mask))


def split(records: list, eval_fraction: float) -> tuple[list, list]:
    """(train, held-out): a fixed shuffle, then the last ``eval_fraction`` of the records held out."""
    order = list(range(len(records)))
    random.Random(SPLIT_SEED).shuffle(order)
    n = len(records)
    n_eval = min(max(1, round(n * eval_fraction)), n - 1) if n > 1 and eval_fraction > 0 else 0
    cut = n - n_eval
    return [records[i] for i in order[:cut]], [records[i] for i in order[cut:]]


class SampleOrder:
    """Sample index i -> row: epoch i // n reads a permutation of the n rows drawn from (seed, epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def __call__(self, start: int, count: int) -> torch.Tensor:
        out = []
        for i in range(start, start + count):
            epoch = i // self.n
            if epoch != self._epoch:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
            out.append(int(self._perm[i % self.n]))
        return torch.tensor(out, dtype=torch.int64)
