"""`omniforge eval`: score a checkpoint on benchmarks and JSONL task sets.

    omniforge eval --checkpoint runs/demo/checkpoint --task librispeech=/data/LibriSpeech/test-clean \
        --task mme=/data/MME --task synth=/data/synth/test --limit 200 --out runs/eval --compare old/scores.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

KIND_HELP = ("kinds: librispeech (split folder), aishell (corpus root), mme (category folders), mmbench (.tsv), "
             "videomme (annotation .json/.jsonl + videos/), covost (.tsv + clips/), jsonl (file or folder), "
             "synth (folder: one task per *.jsonl)")


def add_parser(commands) -> argparse.ArgumentParser:
    """Add the `eval` sub-command to an argparse sub-parsers object."""
    parser = commands.add_parser("eval", help="score a checkpoint on benchmarks (predictions, scores.json, scores.md)",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="folder written by save_pretrained")
    parser.add_argument("--task", action="append", required=True, metavar="[LABEL:]KIND=PATH",
                        help=f"a benchmark to run (repeatable); {KIND_HELP}")
    parser.add_argument("--limit", type=int, default=None, help="first N entries of each task (MMBench: questions)")
    parser.add_argument("--out", type=Path, default=Path("runs/eval"), help="folder for predictions/ and scores")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="answer budget for every task (default: by metric, 16 for a letter to 256 for a transcript)")
    parser.add_argument("--contrast", type=float, default=0.0,
                        help="visual contrastive decoding: weight of the blank-picture logits taken away (0: off)")
    parser.add_argument("--ctc-weight", type=float, default=0.0,
                        help="joint CTC/attention decoding of transcripts (ASR answers, what a spoken question was "
                             "heard as): weight of the audio tower's CTC prefix score (0: off)")
    parser.add_argument("--compare", type=Path, default=None, metavar="SCORES_JSON",
                        help="another run's scores.json: print the difference per metric")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="model config override (repeatable), e.g. vision.max_tiles=6")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run `omniforge eval`; data and the comparison file are checked before the model is loaded."""
    import torch

    from omniforge.errors import ConfigError
    from omniforge.eval.readers import load_tasks, parse_task_spec
    from omniforge.eval.runner import compare_markdown, evaluate, load_scores, require_distinct_names, scores_markdown
    from omniforge.model.generate import GenerationConfig
    from omniforge.model.omni import OmniModel

    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise ConfigError("--batch-size and --limit must be >= 1")
    tasks = [task for text in args.task for task in load_tasks(parse_task_spec(text), args.limit)]
    require_distinct_names(tasks)
    other = load_scores(args.compare) if args.compare else None
    decoding = GenerationConfig(contrast=args.contrast, ctc_weight=args.ctc_weight)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = OmniModel.from_pretrained(args.checkpoint, args.overrides).to(device)
    results = evaluate(model, tasks, args.out, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                       decoding=decoding)
    print(scores_markdown(results))
    if other is not None:
        print(compare_markdown(results, other))
    print(f"predictions in {args.out / 'predictions'}, scores in {args.out / 'scores.json'}")
    return 0
