"""The Trainer never computes a loss of its own: label smoothing goes through our shifted, token-weighted loss,
options that would weigh tokens differently are refused, and the evaluation loss weighs every supervised token
of the validation set the same, with no KV cache."""

from __future__ import annotations

import pytest
import torch

from dataset import DataCollator
from model import apply_lora, build_vlm, vlm_config_for
from settings.training import TrainArguments
from training.trainer import VLMTrainer, unsupported_options

PAD = 151643


@pytest.fixture(scope="module")
def lora_model(tiny_llm_dir, tiny_clip_dir):
    torch.manual_seed(0)
    model = build_vlm(tiny_llm_dir, tiny_clip_dir)
    peft_model = apply_lora(model, r=4, alpha=8, dropout=0.0, verbose=False)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=1.0)
    return peft_model


def make_trainer(lora_model, tmp_path, eval_dataset=None, **options):
    args = TrainArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", disable_tqdm=True,
                          per_device_eval_batch_size=2, **options)
    return VLMTrainer(
        model=lora_model, args=args, eval_dataset=eval_dataset, data_collator=DataCollator(pad_token_id=PAD),
        bundle_config=vlm_config_for(lora_model, "llm", "clip", "system"), projector_learning_rate=1e-3,
    )


def item(length, supervised, seed):
    """A text-only sample of `length` tokens whose last `supervised` tokens are answer tokens."""
    ids = torch.randint(0, 1000, (length,), generator=torch.Generator().manual_seed(seed))
    labels = torch.full_like(ids, -100)
    labels[length - supervised:] = ids[length - supervised:]
    return {"input_ids": ids, "labels": labels, "pixel_values": None}


def reference_sums(lora_model, items, eps=0.0):
    """(summed token loss, token count) of each item from full logits, shifted here, (1 - eps) NLL + eps uniform."""
    out = []
    with torch.no_grad():
        for it in items:
            logits = lora_model(input_ids=it["input_ids"][None], return_logits=True).logits[0].double()
            logp = torch.log_softmax(logits[:-1], -1)
            target = it["labels"][1:]
            keep = target != -100
            nll = -logp[keep].gather(-1, target[keep][:, None])[:, 0]
            out.append((float(((1 - eps) * nll - eps * logp[keep].mean(-1)).sum()), int(keep.sum())))
    return out


def test_label_smoothing_goes_through_our_shifted_token_weighted_loss(lora_model, tmp_path):
    items = [item(12, 8, 1), item(9, 2, 2)]
    trainer = make_trainer(lora_model, tmp_path, label_smoothing_factor=0.1)
    assert trainer.label_smoother is None  # the Trainer's own smoother (unshifted, full logits) never runs
    batch = DataCollator(pad_token_id=PAD)(items)
    lora_model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(lora_model, dict(batch), num_items_in_batch=torch.tensor(25))
    lora_model.eval()
    sums = reference_sums(lora_model, items, eps=0.1)
    assert abs(float(loss) - sum(s for s, _ in sums) / 25) < 1e-5


@pytest.mark.parametrize("option,value,message", [
    ("average_tokens_across_devices", False, "average_tokens_across_devices"),
    ("label_names", ["answer"], "label_names"),
    ("label_smoothing_factor", -0.1, "label_smoothing_factor"),
    ("activation_checkpointing_kwargs", {"use_reentrant": True}, "use_reentrant"),
])
def test_options_that_would_change_the_loss_are_named(tmp_path, option, value, message):
    args = TrainArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **{option: value})
    problems = unsupported_options(args)
    assert len(problems) == 1 and problems[0].startswith(message)
    assert unsupported_options(TrainArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")) == []


def test_eval_loss_is_token_weighted_over_the_whole_set(lora_model, tmp_path):
    # batches of 2: (30 + 25 supervised tokens), (1 + 2), (3): a mean of batch means would weigh 3 tokens like 55
    items = [item(34, 30, 3), item(30, 25, 4), item(8, 1, 5), item(9, 2, 6), item(10, 3, 7)]
    trainer = make_trainer(lora_model, tmp_path, eval_dataset=items)
    metrics = trainer.evaluate()
    sums = reference_sums(lora_model, items)
    expected = sum(s for s, _ in sums) / sum(n for _, n in sums)
    batch_means = [sum(s for s, _ in sums[i:i + 2]) / sum(n for _, n in sums[i:i + 2]) for i in (0, 2, 4)]
    assert abs(sum(batch_means) / 3 - expected) > 1e-2  # the test can tell the two apart
    assert abs(metrics["eval_loss"] - expected) < 1e-5


def test_an_eval_step_builds_no_kv_cache(lora_model, tmp_path, monkeypatch):
    import qwen.modeling_qwen as modeling

    made = []
    real = modeling.DynamicCache
    monkeypatch.setattr(modeling, "DynamicCache", lambda *a, **k: made.append(1) or real(*a, **k))
    trainer = make_trainer(lora_model, tmp_path, use_cache=True)  # the Trainer sets config.use_cache from it
    assert lora_model.config.use_cache is True
    try:
        batch = DataCollator(pad_token_id=PAD)([item(12, 8, 1), item(9, 2, 2)])
        loss, logits, labels = trainer.prediction_step(lora_model.eval(), batch, prediction_loss_only=True)
    finally:
        lora_model.config.use_cache = False
    assert loss is not None and made == []
