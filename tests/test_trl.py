"""TRL's SFTTrainer trains, checkpoints and resumes an accelerated PEFT model and an injected 4-bit model.

The data are pre-tokenized rows (SFTTrainer takes them as they are) and the tokenizer is a word-level one
built in memory, so nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch
from lora_models import check_accelerated_peft_checkpoints, check_injected_checkpoints, tiny_llama, token_ids

import fusedlora as fl
from fusedlora.inject import lora_layers

pytest.importorskip("trl")


def _tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(97)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                   pad_token="t0", eos_token="t1")


def sft_run(model, out_dir, resume=None, stop_after=None) -> dict[int, float]:
    """SFTTrainer.train of 4 planned steps, a checkpoint every 2; ``stop_after``: cut there."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == stop_after:
                control.should_training_stop = True

    rows = Dataset.from_dict({"input_ids": [r.tolist() for r in token_ids(seed=11, batch=8, seq=12)]})
    # bf16=False: SFTConfig turns on bf16 autocast by default and leaves the model's forward wrapped in it;
    # fp32 keeps the comparisons below exact
    args = SFTConfig(output_dir=str(out_dir), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
                     save_steps=2, logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                     bf16=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=_tokenizer(),
                         callbacks=[Stop()] if stop_after else None)
    trainer.train(resume_from_checkpoint=resume)
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


@pytest.mark.parametrize("use_dora", [False, True])
def test_sft_trainer_injected_nf4_model(tmp_path, use_dora):
    def model():
        torch.manual_seed(3)
        return fl.inject(tiny_llama(), r=4, alpha=8, quantize="nf4", init_lora_weights=False, use_dora=use_dora)

    full, reloaded = check_injected_checkpoints(sft_run, model, tmp_path)
    assert sorted(full) == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(v)) for v in full.values())
    assert all(layer.dora == use_dora for layer in lora_layers(reloaded).values())


def test_sft_trainer_accelerated_peft_model_reloads_in_plain_peft(tmp_path):
    assert sorted(check_accelerated_peft_checkpoints(sft_run, tiny_llama(), tmp_path)) == [1, 2, 3, 4]
