"""Does a checkpoint bind attributes to objects? Every object of fresh scenes of two or three
shapes is asked its colour ("What colour is the <shape>?"), its shape ("What shape is
<colour>?") and its size ("Is the <shape> big or small?"); accuracy by shape count, next to
what a model that sees which attributes are present but not which object has which would get.

    python bench/lookups.py runs/demo/checkpoint [--scenes 120] [--split val] [--seed 1234] [--contrast 2]

The demo's test split asks about 15 questions of each kind; this asks ~900, so the lookups'
state shows clearly (BENCHMARKS.md, session 8). Size is split by whether the scene's shapes
share a size: when they do, the answer needs no binding. On the test split, the colour and shape
lookups of objects in a held-out (colour, shape) pair, never seen in training, get rows of their own
(the first two rows then count the training pairs only).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from omniforge.data.synthetic import scenes  # noqa: E402
from omniforge.data.synthetic.world import TILE, lookup_question, size_question  # noqa: E402
from omniforge.eval.readers import TaskSpec, load_tasks  # noqa: E402
from omniforge.eval.runner import evaluate  # noqa: E402
from omniforge.model.generate import GenerationConfig  # noqa: E402
from omniforge.model.omni import OmniModel  # noqa: E402

KINDS = {"colour": ("What colour is the <shape>?", (50, 33)), "shape": ("What shape is <colour>?", (50, 33)),
         "colour, held-out pair": ("What colour is the <shape>? (a held-out pair's object)", (50, 33)),
         "shape, held-out pair": ("What shape is <colour>? (a held-out pair's object)", (50, 33)),
         "size, sizes differ": ("Is the <shape> big or small? (sizes differ)", (50, 50)),
         "size, one size": ("Is the <shape> big or small? (one size)", (100, 100))}
"""Per kind of question: its row label, and the accuracy (2 / 3 shapes) of answering with any
attribute present, the asked object's or not."""


def questions(shapes: list[scenes.Shape]) -> list[tuple[str, str, str]]:
    """(kind, question, answer): the three lookups of every shape of a scene; the colour and
    shape lookups of a held-out pair's object (test split only) are kinds of their own."""
    sizes = "size, one size" if len({s.big for s in shapes}) == 1 else "size, sizes differ"
    items = []
    for shape in shapes:
        held_out = ", held-out pair" if (shape.colour, shape.kind) in scenes.HELD_OUT else ""
        items += [(f"colour{held_out}", *lookup_question(shape, by_colour=False)),
                  (f"shape{held_out}", *lookup_question(shape, by_colour=True)), (sizes, *size_question(shape))]
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a saved omniforge model (e.g. runs/demo/checkpoint)")
    parser.add_argument("--scenes", type=int, default=120, help="fresh scenes to ask about")
    parser.add_argument("--split", default="val", choices=("train", "val", "test"),
                        help="which (colour, shape) pairs the scenes may use (test adds the held-out ones)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--contrast", type=float, default=0.0, help="visual contrastive decoding's weight (0: off)")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rng = np.random.default_rng(args.seed)
    kinds, counts, lines = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for i in range(args.scenes):
            shapes = scenes.scene(rng, args.split, int(rng.integers(2, 4)))
            scenes.render(shapes, TILE, TILE, rng).save(folder / f"scene_{i}.png")
            for kind, question, answer in questions(shapes):
                kinds.append(kind)
                counts.append(len(shapes))
                lines.append(json.dumps({"id": str(len(lines)),
                                         "messages": [{"role": "user", "content": f"<image>\n{question}"},
                                                      {"role": "assistant", "content": answer}],
                                         "images": [f"scene_{i}.png"], "metric": "exact_match"}))
        (folder / "lookups.jsonl").write_text("\n".join(lines) + "\n")
        tasks = load_tasks(TaskSpec("lookups", "jsonl", folder / "lookups.jsonl"))
        evaluate(OmniModel.from_pretrained(args.checkpoint), tasks, folder / "eval", batch_size=32,
                 max_new_tokens=8, progress=False, decoding=GenerationConfig(contrast=args.contrast))
        predictions = (folder / "eval" / "predictions" / f"{tasks[0].name}.jsonl").read_text().splitlines()
        verdicts = {p["id"]: p["correct"] for p in map(json.loads, predictions) if "correct" in p}  # skipped: none
    right = defaultdict(list)
    for n, (kind, count) in enumerate(zip(kinds, counts)):
        if str(n) in verdicts:
            right[kind, count].append(bool(verdicts[str(n)]))
    print(f"{args.checkpoint}: {len(verdicts)} questions about {args.scenes} fresh {args.split}-split scenes\n")
    print("| question | 2 shapes | 3 shapes | attributes without binding (2 / 3) |\n|---|---|---|---|")
    for kind, (label, chance) in KINDS.items():
        cells = [f"{100 * np.mean(right[kind, n]):.0f} % ({len(right[kind, n])})" if right[kind, n] else "-"
                 for n in (2, 3)]
        print(f"| {label} | {cells[0]} | {cells[1]} | {chance[0]} / {chance[1]} % |")


if __name__ == "__main__":
    main()
