"""Does a checkpoint's audio tower still fit the CTC head that `audio.ctc_posteriors` reads?

The posterior mix reads the tower through the head it was pretrained with, and the head never
trains; a tower trained away from it feeds the LLM misread words. This decodes the world's ASR
utterances greedily through that head, per split: the demo's pretrained stand-in reads about
3 % WER on val; trained at 1e-3 in stage 2 it read 133 % (BENCHMARKS.md, session 10).

    python bench/ctc_fit.py runs/demo/checkpoint --world runs/demo/world [--splits val,test]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from omniforge.model.omni import OmniModel  # noqa: E402
from omniforge.train.encoders import ctc_wer, transcribed_utterances  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a saved omniforge model (e.g. runs/demo/checkpoint)")
    parser.add_argument("--world", type=Path, required=True, help="the synthetic world it was trained on")
    parser.add_argument("--splits", default="val,test", help="comma-separated splits to decode")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = OmniModel.from_pretrained(args.checkpoint).eval()
    audio = model.audio
    if audio is None or audio.ctc_weight is None:
        sys.exit(f"{args.checkpoint}: no audio tower with a CTC head (audio.ctc_posteriors is off)")

    print(f"{args.checkpoint}: greedy CTC through the tower's own head\n\n| split | utterances | WER |\n|---|---|---|")
    for split in args.splits.split(","):
        utterances = transcribed_utterances(args.world / split / "asr.jsonl", audio, model.tokenizer, print)
        print(f"| {split} | {len(utterances)} | {ctc_wer(audio, audio.ctc_logits, utterances, model.tokenizer):.1f} % |")


if __name__ == "__main__":
    main()
