"""Evaluation: benchmark readers, metrics, the batched runner, `omniforge eval`, and harness adapters.

    readers.py   benchmarks as distributed (LibriSpeech, AISHELL-1, MME, MMBench, Video-MME, CoVoST 2, JSONL) -> samples
    metrics.py   the field's metrics as pure functions (MME, CircularEval, Video-MME, WER/CER, BLEU/chrF, ...)
    runner.py    batched generation, per-sample predictions, scores.json / scores.md, comparisons
    cli.py       `omniforge eval`
    harness.py   lmms-eval and VLMEvalKit model classes wrapping a checkpoint
"""
