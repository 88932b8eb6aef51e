"""Evaluation: what training bought, in numbers (`evaluate.py`, the training callback, the demo's demo_eval.json).

    text.py        tokenisation per language (English PTB-style or the official PTB tokenizer; Chinese: jieba),
                   language detection, short-answer normalisation
    scoring.py     corpus BLEU-1..4, ROUGE-L and CIDEr-D per language (pycocoevalcap's scorers), accuracy
    rouge.py       pycocoevalcap's ROUGE-L with a bounded-memory LCS (bit-parallel, in blocks)
    samples.py     what is asked and scored: samples of a processed JSONL, predictions files, shuffled pairing
    generation.py  answers with the image, a blank image and shuffled images (the shared generation path)
    runner.py      samples or predictions -> metrics and per-sample rows
    report.py      metrics.json, predictions.jsonl, report.md, each written whole
    callback.py    generation metrics at every evaluation during training
"""
