"""Data formats a user brings: chat records through the tokenizer's chat template (labels on assistant turns
only), Alpaca records, and packing that keeps records apart (per-token losses equal to each record alone)."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from fusedlora.train.data import (
    IGNORE,
    ByteTokenizer,
    Chat,
    HFTokenizer,
    alpaca_prompt,
    build_sequences,
    load_jsonl,
    tokenize,
)
from fusedlora.train.main import main

# A template of our own: role markers, the content, then the end-of-sequence token after each turn.
TEMPLATE = ("{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }} {{ eos_token }} {% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT: {% endif %}")
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 1 plus 2 ?"},
        {"role": "assistant", "content": "it is 3 ."}, {"role": "user", "content": "and 2 plus 2 ?"},
        {"role": "assistant", "content": "4 ."}]


def _chat_tokenizer(path):
    """A whitespace word-level tokenizer with TEMPLATE as its chat template, saved in ``path`` (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for m in CHAT for w in m["content"].split()} | {"SYSTEM:", "USER:", "ASSISTANT:"})
    vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", "</s>", "<pad>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="[UNK]")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(path)
    return len(vocab)


def test_chat_labels_cover_the_assistant_turns_only(tmp_path):
    from transformers import AutoTokenizer

    _chat_tokenizer(tmp_path)
    tok = HFTokenizer(AutoTokenizer.from_pretrained(tmp_path, local_files_only=True))
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": CHAT}) + "\n")
    (record,) = load_jsonl(str(data))
    assert isinstance(record, Chat) and record.where == f"{data} line 1"
    ids, labels = tokenize(record, tok)
    whole = tok.tok.apply_chat_template(CHAT, tokenize=False)
    assert ids == tok.tok(whole, add_special_tokens=False)["input_ids"]
    labeled = tok.tok.convert_ids_to_tokens([t for t in labels if t != IGNORE])
    assert labeled == ["it", "is", "3", ".", "</s>", "4", "."] + ["</s>"]
    assert [i for i, t in zip(ids, labels, strict=True) if t != IGNORE] == [t for t in labels if t != IGNORE]


@pytest.mark.parametrize("messages, needle", [
    ([{"role": "user", "content": "hi"}], "no assistant message"),
    ([{"role": "robot", "content": "hi"}], "messages[0] must be"),
    ("hello", '"messages" must be a non-empty list'),
    ([{"role": "assistant", "content": "hi"}], "opens with an assistant message"),
])
def test_bad_chat_records_name_the_line(tmp_path, messages, needle):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"messages": messages}) + "\n")
    with pytest.raises(ValueError, match=f"chat.jsonl line 2: .*{needle.replace('[', '.').replace(']', '.')}"):
        load_jsonl(str(data))


def test_alpaca_records(tmp_path):
    data = tmp_path / "alpaca.jsonl"
    data.write_text(json.dumps({"instruction": "add", "input": "1 2", "output": "3"}) + "\n"
                    + json.dumps({"instruction": "greet", "output": "hi"}) + "\n")
    tok = ByteTokenizer()
    records = load_jsonl(str(data))
    assert records == [(alpaca_prompt("add", "1 2"), "3"), (alpaca_prompt("greet", ""), "hi")]
    assert "1 2" in records[0][0] and "Input" not in records[1][0]
    ids, labels = tokenize(records[1], tok)
    assert [t for t in labels if t != IGNORE] == [*b"hi", tok.eos_token_id]


def _per_token_losses(model, inputs):
    with torch.no_grad():
        logits = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), inputs["labels"][:, 1:], ignore_index=IGNORE,
                           reduction="none")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_records_do_not_attend_to_each_other(attn):
    """Per-token losses of packed rows equal each record's losses alone (fp32, the same math over shorter
    attention rows: 1e-5); attending across records (one attention mask over the row) changes them."""
    from fusedlora.train.model import tiny_llama

    model, tok = tiny_llama()
    model.set_attn_implementation(attn)
    model.eval()
    records = [("", "the red cat sees"), ("q: 1+2?", " 3"), ("", "one two three four"), ("", "x")]
    packed = build_sequences(records, tok, seq_len=48, pack=True)
    assert len(packed) == 2  # three records share the first row
    losses = _per_token_losses(model, packed.rows(torch.arange(len(packed))))
    crossing = packed.rows(torch.arange(len(packed)))
    crossing = {"input_ids": crossing["input_ids"], "labels": crossing["labels"],
                "attention_mask": packed.attention_mask}
    crossed = _per_token_losses(model, crossing)
    row, start, n_far = 0, 0, 0
    for record in records:
        ids, labels = tokenize(record, tok)
        if start + len(ids) > 48:
            row, start = row + 1, 0
        alone = _per_token_losses(model, {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels])})
        got = losses[row, start:start + len(ids) - 1]
        torch.testing.assert_close(got, alone[0], rtol=1e-5, atol=1e-5)
        if start > 0:  # a record after another in its row: with attention across records its losses move
            n_far += 1
            assert (crossed[row, start:start + len(ids) - 1] - alone[0]).abs().max() > 1e-3
        start += len(ids)
    assert n_far == 2


def test_chat_data_trains_end_to_end(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = str(tmp_path / "chat-llama")
    n_vocab = _chat_tokenizer(hf)
    config = LlamaConfig(vocab_size=n_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(hf)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": CHAT[i:]}) + "\n" for i in (0, 1, 3)))
    out = str(tmp_path / "run")
    assert main(["--model", hf, "--data", str(data), "--steps", "2", "--batch-size", "2", "--seq-len", "48",
                 "--rank", "2", "--eval-fraction", "0", "--out", out]) == 0
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in log] == [1, 2] and all(r["loss"] > 0 for r in log)
