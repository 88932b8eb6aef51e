"""Generation metrics during training: `training.eval_generation_samples: N` (0, the default, is off).

At every evaluation (each `eval_steps`, and train.py's final one), the model being trained answers the first
N samples of the validation file greedily, with their images, exactly as `evaluate.py` asks them (see
`evaluation.samples`), and the scores join the evaluation's metrics: `eval_cider_<lang>` and
`eval_bleu_4_<lang>` for each language with caption samples, `eval_accuracy` when there are short answers.
They are logged through the Trainer's own `log` at the evaluation's step, so they reach TensorBoard (as
eval/cider_zh, ...) beside eval/loss, the log history and `eval_results.json`, and `metric_for_best_model`
can name them. Every rank runs the same generation (N is small); the Trainer logs once.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

MAX_NEW_TOKENS = 128


class GenerationEvalCallback(TrainerCallback):
    def __init__(self, trainer, eval_file: str, n_samples: int, tokenizer, bundle_config,
                 max_new_tokens: int = MAX_NEW_TOKENS):
        from evaluation.samples import read_processed
        from visual import load_image_preprocessor

        self.trainer = trainer
        self.samples = read_processed(eval_file, limit=n_samples)
        self.max_new_tokens = max_new_tokens
        self.tokenizer = tokenizer
        self.processor = load_image_preprocessor(bundle_config.vision.path)
        self.bundle_config = bundle_config

    def generation_metrics(self, model, batch_size: int) -> dict[str, float]:
        from evaluation.runner import evaluate_samples
        from inference import LoadedCheckpoint
        from model.bundle import unwrap

        base = unwrap(model)  # the LoRA layers live inside its language model: generation sees them as trained
        was_training = base.training
        base.eval()
        loaded = LoadedCheckpoint(model=base, tokenizer=self.tokenizer, processor=self.processor,
                                  config=self.bundle_config, folder=Path(self.trainer.args.output_dir),
                                  device=next(base.parameters()).device)
        try:
            result, _ = evaluate_samples(loaded, self.samples, passes=("with_image",), batch_size=batch_size,
                                         max_new_tokens=self.max_new_tokens, progress=False, memo=False)
        finally:
            base.train(was_training)
        logs = {}
        for lang in ("en", "zh"):
            for metric in ("cider", "bleu_4"):
                if result[lang][metric] is not None:
                    logs[f"eval_{metric}_{lang}"] = result[lang][metric]
        if result["accuracy"] is not None:
            logs["eval_accuracy"] = result["accuracy"]
        return logs

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if not self.samples or metrics is None:
            return
        logs = self.generation_metrics(model if model is not None else self.trainer.model,
                                       args.per_device_eval_batch_size)
        metrics.update(logs)
        self.trainer.log(dict(logs))
