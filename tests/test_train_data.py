"""The trainer's data and config pieces, without a model: records, labels, packing/padding, split, order,
and the --resume rules."""

import argparse
import json

import pytest
import torch

from fusedlora.train.config import TrainConfig, add_arguments, given_fields, parse_target_modules, resolve
from fusedlora.train.data import (
    IGNORE,
    ByteTokenizer,
    SampleOrder,
    build_sequences,
    builtin_records,
    load_jsonl,
    split,
    tokenize,
)


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_jsonl_text_and_prompt_completion(tmp_path):
    path = _write(tmp_path / "d.jsonl", [
        json.dumps({"text": "héllo"}),
        "",
        json.dumps({"prompt": "Q: 2+2?", "completion": " 4", "extra": 1}),
    ])
    assert load_jsonl(path) == [("", "héllo"), ("Q: 2+2?", " 4")]


@pytest.mark.parametrize("bad, needle", [
    (json.dumps({"prompt": "only a prompt"}), 'line 2: expected a "text" field, or "prompt" and "completion"'),
    (json.dumps({"text": 5}), 'line 2: "text" must be a string, got int'),
    ("{not json", "line 2: not valid JSON"),
    (json.dumps(["text"]), "line 2: expected a JSON object, got list"),
])
def test_jsonl_bad_line_names_the_line(tmp_path, bad, needle):
    path = _write(tmp_path / "d.jsonl", [json.dumps({"text": "fine"}), bad, json.dumps({"text": "fine"})])
    with pytest.raises(ValueError, match="d.jsonl " + needle.replace("+", r"\+").replace("(", r"\(")):
        load_jsonl(path)


def test_labels_cover_completion_and_eos_only():
    tok = ByteTokenizer()
    ids, labels = tokenize(("ab", "cde"), tok)
    assert ids == [tok.bos_token_id, 97, 98, 99, 100, 101, tok.eos_token_id]
    assert labels == [IGNORE, IGNORE, IGNORE, 99, 100, 101, tok.eos_token_id]
    ids, labels = tokenize(("", "xy"), tok)  # a "text" record: everything but BOS is a label
    assert labels == [IGNORE, 120, 121, tok.eos_token_id]


def test_packing_places_records_whole_and_padding():
    tok = ByteTokenizer()
    records = [("p", "abc"), ("", "defgh"), ("qq", "i")]
    encoded = [tokenize(r, tok) for r in records]
    assert [len(ids) for ids, _ in encoded] == [6, 7, 5]
    packed = build_sequences(records, tok, seq_len=12, pack=True)
    # 6 + 7 > 12: the second record starts a row of its own, the third fits after it (7 + 5 = 12).
    assert packed.input_ids.shape == (2, 12)
    assert packed.input_ids[0, :6].tolist() == encoded[0][0] and packed.labels[0, :6].tolist() == encoded[0][1]
    assert packed.input_ids[1].tolist() == encoded[1][0] + encoded[2][0]
    assert packed.labels[1].tolist() == encoded[1][1] + encoded[2][1]
    assert packed.attention_mask.sum(1).tolist() == [6, 12]
    # Positions restart with each record; the padding closing row 0 is a block of its own.
    assert packed.position_ids[1].tolist() == [*range(7), *range(5)]
    assert packed.position_ids[0].tolist() == [*range(6), *range(6)]
    assert (packed.labels[0, 6:] == IGNORE).all() and (packed.input_ids[0, 6:] == tok.pad_token_id).all()
    assert set(packed.rows(torch.arange(2))) == {"input_ids", "labels", "position_ids"}

    padded = build_sequences(records, tok, seq_len=6, pack=False)
    assert padded.input_ids.shape == (3, 6)
    assert padded.attention_mask.sum(1).tolist() == [6, 6, 5]  # the second record is cut at 6
    ids, labels = encoded[2]
    assert padded.input_ids[2, :5].tolist() == ids and padded.labels[2, :5].tolist() == labels
    assert padded.labels[2, 5] == IGNORE and padded.input_ids[2, 5] == tok.pad_token_id
    assert set(padded.rows(torch.arange(2))) == {"input_ids", "labels", "attention_mask"}


def test_split_is_fixed_and_disjoint():
    records = builtin_records(200)
    train, held = split(records, 0.1)
    assert len(held) == 20 and len(train) == 180
    assert split(records, 0.1) == (train, held)
    assert sorted(train + held) == sorted(records)
    assert split(records[:1], 0.1) == (records[:1], [])


def test_sample_order_is_a_pure_function_of_position():
    order = SampleOrder(7, seed=3)
    seq = order(0, 30)
    assert sorted(seq[:7].tolist()) == list(range(7)) and sorted(seq[7:14].tolist()) == list(range(7))
    assert not torch.equal(seq[:7], seq[7:14])  # each epoch draws its own permutation
    assert torch.equal(SampleOrder(7, seed=3)(12, 9), seq[12:21])  # a fresh reader resumes mid-epoch
    assert not torch.equal(SampleOrder(7, seed=4)(0, 30), seq)


def _given(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return given_fields(parser.parse_args(argv))


def test_target_modules_words():
    assert parse_target_modules(["all-linear"]) == "all-linear"
    assert parse_target_modules([".*q_proj"]) == ".*q_proj"
    assert parse_target_modules(["q_proj"]) == ["q_proj"]
    assert parse_target_modules(["q_proj", "v_proj"]) == ["q_proj", "v_proj"]


def test_resume_takes_checkpoint_config_and_rejects_differences(tmp_path):
    saved = TrainConfig(steps=40, lr=1e-3, rank=4, out=str(tmp_path)).to_dict()
    config = resolve(_given(["--resume", "--out", str(tmp_path)]), saved)
    assert (config.steps, config.lr, config.rank, config.resume) == (40, 1e-3, 4, True)
    # Given values equal to the checkpoint's pass, also when the types differ (an int for a float field).
    assert resolve(_given(["--resume", "--steps", "40", "--rank", "4"]), saved).steps == 40
    with pytest.raises(ValueError, match=r"--lr: checkpoint has 0.001, command line gives 0.002") as info:
        resolve(_given(["--resume", "--lr", "2e-3", "--steps", "39"]), saved)
    assert "--steps: checkpoint has 40, command line gives 39 (a run can be extended, not shortened)" in str(info.value)
    # A larger --steps extends the run; a larger --epochs too (steps are then recomputed from the data).
    assert resolve(_given(["--resume", "--steps", "60"]), saved).steps == 60
    extended = resolve(_given(["--resume", "--epochs", "2"]), {**saved, "epochs": 1.0})
    assert extended.epochs == 2.0
    with pytest.raises(ValueError, match=r"--epochs: checkpoint has 1.0, command line gives 0.5"):
        resolve(_given(["--resume", "--epochs", "0.5"]), {**saved, "epochs": 1.0})


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="quantize: expected one of"):
        TrainConfig(quantize="fp8")
    with pytest.raises(ValueError, match="steps: expected a positive integer, got 0"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match=r"dropout: expected a float in \[0, 1\), got 1.5"):
        TrainConfig(dropout=1.5)
