"""Training data: records, tokenizers, packing or padding into fixed-length sequences, the held-out split.

A record is a (prompt, completion) pair of strings, or a chat (``Chat``). A "text" record is ("", text); an
Alpaca record (instruction, optional input, output) is its prompt rendered by ``alpaca_prompt`` and the
output as completion. Tokens of the prompt carry the label IGNORE, so the loss covers the completion (all
of a "text" record) and its end-of-sequence token. A chat is rendered with the tokenizer's chat template;
only the assistant turns' tokens are labels. Sequences are [seq_len] rows of input_ids, labels,
attention_mask and position_ids:

- packed (default): whole records placed one after another into rows, a record that does not fit in what
  is left of a row starting the next one (a record longer than seq_len is cut to it, alone in its row).
  Position ids restart at 0 with each record, and the model gets no 2-D attention mask: transformers reads
  the restarts as packed sequences and attends within each record only (a block-diagonal causal mask), so
  a record's losses are those it has alone. The padding closing a row is a block of its own, unlabeled.
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
        self.chat_template = getattr(tok, "chat_template", None)
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

    def render_chat(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


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


@dataclass(frozen=True)
class Chat:
    """A conversation: [{"role": ..., "content": ...}, ...] with at least one assistant turn; ``where`` names
    its file and line for errors."""

    messages: tuple
    where: str


ROLES = ("system", "user", "assistant", "tool")
FORMATS = ('a "text" field, or "prompt" and "completion", or "instruction" and "output" (and optional "input"), '
           'or "messages"')


def alpaca_prompt(instruction: str, input: str) -> str:
    """The prompt of an Alpaca-style record; the output follows it as the completion."""
    parts = [f"Instruction:\n{instruction}"] + ([f"Input:\n{input}"] if input else [])
    return "\n\n".join(parts) + "\n\nResponse:\n"


def _strings(obj: dict, names, where: str) -> list[str]:
    for name in names:
        if not isinstance(obj.get(name), str):
            raise ValueError(f'{where}: "{name}" must be a string, got {type(obj.get(name)).__name__}')
    return [obj[name] for name in names]


def _chat(messages, where: str) -> Chat:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f'{where}: messages[{k}] must be {{"role": one of {list(ROLES)}, "content": a string}}, '
                             f"got {json.dumps(m)[:80]}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no assistant message (the loss covers assistant turns only)")
    if messages[0]["role"] == "assistant":
        raise ValueError(f"{where}: the conversation opens with an assistant message (expected a system or user "
                         "message first: the template renders what the assistant answers)")
    return Chat(tuple({"role": m["role"], "content": m["content"]} for m in messages), where)


def parse_record(obj, where: str):
    """One record from one JSON value, in any of the FORMATS."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        return _chat(obj["messages"], where)
    if "text" in obj:
        return ("", *_strings(obj, ("text",), where))
    if "prompt" in obj and "completion" in obj:
        return tuple(_strings(obj, ("prompt", "completion"), where))
    if "instruction" in obj and "output" in obj:
        instruction, output = _strings(obj, ("instruction", "output"), where)
        extra = _strings(obj, ("input",), where)[0] if obj.get("input") is not None else ""
        return alpaca_prompt(instruction, extra), output
    raise ValueError(f"{where}: expected {FORMATS}; got keys {sorted(obj)}")


def load_jsonl(path: str) -> list:
    """Records from a JSONL file, every line parsed (blank lines skipped); errors name the file and line."""
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path} line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad = f"byte 0x{raw[exc.start]:02x} at column {exc.start + 1}"
                raise ValueError(f"{where}: not UTF-8 ({bad})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            records.append(parse_record(obj, where))
    if not records:
        raise ValueError(f"{path}: no records (expected JSON lines, each with {FORMATS})")
    return records


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Tokens and sequences


def tokenize(record, tokenizer) -> tuple[list[int], list[int]]:
    """input ids and labels of one record: BOS + prompt (not labels) + completion + EOS (labels); a chat as
    its template renders it, labels on the assistant turns."""
    if isinstance(record, Chat):
        return _tokenize_chat(record, tokenizer)
    prompt, completion = record
    head = tokenizer.encode(prompt, bos=True)
    tail = tokenizer.encode(completion, bos=False)
    if tokenizer.eos_token_id is not None:
        tail = tail + [tokenizer.eos_token_id]
    return head + tail, [IGNORE] * len(head) + tail


def chat_segments(chat: Chat, tokenizer) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is assistant output) pieces. The template renders the messages
    before assistant turn i with a generation prompt, then through turn i; what the second adds to the
    first is the turn's output (with whatever closes it, e.g. an end-of-turn token)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f'{chat.where}: a "messages" record needs a tokenizer with a chat template '
                         "(--model's tokenizer_config.json has none; the built-in model has none)")
    msgs = list(chat.messages)
    pieces, done = [], ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, chat, msgs[:i], True)
        through = _render(tokenizer, chat, msgs[:i + 1], False)
        if not (before.startswith(done) and through.startswith(before)):
            raise ValueError(f"{chat.where}: the chat template does not render the conversation turn by turn "
                             "(a shorter conversation is not a prefix of a longer one), so the assistant "
                             "tokens cannot be found")
        pieces += [(before[len(done):], False), (through[len(before):], True)]
        done = through
    whole = _render(tokenizer, chat, msgs, False)
    if whole.startswith(done) and len(whole) > len(done):
        pieces.append((whole[len(done):], False))
    return [(text, label) for text, label in pieces if text]


def _render(tokenizer, chat: Chat, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.render_chat(messages, add_generation_prompt)
    except Exception as exc:  # jinja2's and transformers' errors, raised from the template
        raise ValueError(f"{chat.where}: the chat template failed ({type(exc).__name__}: {exc})") from None


def _tokenize_chat(chat: Chat, tokenizer) -> tuple[list[int], list[int]]:
    ids, labels = [], []
    for text, is_output in chat_segments(chat, tokenizer):
        t = tokenizer.encode(text, bos=False)
        ids += t
        labels += t if is_output else [IGNORE] * len(t)
    return ids, labels


@dataclass
class Sequences:
    """Rows of equal length: input_ids, labels, attention_mask (1 on tokens, 0 on padding), position_ids,
    each int64 [n, seq_len]. ``packed``: rows hold several records (see the module docstring)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    packed: bool

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's keyword arguments (labels included) for rows ``index``."""
        out = {"input_ids": self.input_ids[index], "labels": self.labels[index]}
        if self.packed:
            out["position_ids"] = self.position_ids[index]
        else:
            out["attention_mask"] = self.attention_mask[index]
        return out


def build_sequences(records, tokenizer, seq_len: int, pack: bool) -> Sequences:
    pad = tokenizer.pad_token_id
    rows: list[tuple[list[int], list[int], list[int]]] = []  # ids, labels, positions of the row so far
    for record in records:
        ids, labels = tokenize(record, tokenizer)
        ids, labels = ids[:seq_len], labels[:seq_len]
        if not pack or not rows or len(rows[-1][0]) + len(ids) > seq_len:
            rows.append(([], [], []))
        row = rows[-1]
        row[0].extend(ids)
        row[1].extend(labels)
        row[2].extend(range(len(ids)))
    n = len(rows)
    out = Sequences(torch.full((n, seq_len), pad, dtype=torch.int64), torch.full((n, seq_len), IGNORE),
                    torch.zeros(n, seq_len, dtype=torch.int64), torch.zeros(n, seq_len, dtype=torch.int64), pack)
    for k, (ids, labels, positions) in enumerate(rows):
        m = len(ids)
        out.input_ids[k, :m] = torch.tensor(ids, dtype=torch.int64)
        out.labels[k, :m] = torch.tensor(labels, dtype=torch.int64)
        out.attention_mask[k, :m] = 1
        # The padding closing a row counts from 0, a block of its own: no record attends to it.
        out.position_ids[k] = torch.tensor(positions + list(range(seq_len - m)), dtype=torch.int64)
    return out


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
