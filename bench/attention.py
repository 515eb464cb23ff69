"""Does the LLM find the object it is asked about? Every shape of fresh scenes of two or three
shapes is asked about by its colour ("What shape is <colour>?") and by its shape ("What colour
is the <shape>?", "Is the <shape> big or small?"). For every layer and head, at the word that
names the object and at the position that answers, we count how often that head pays the most
attention per covered pixel to the asked shape; the best head of each kind is printed beside
chance (one over the shape count).

    python bench/attention.py runs/demo/checkpoint [--scenes 60] [--split val] [--seed 3]

BENCHMARKS.md, session 19 item 7: a first-layer head at the colour word finds the object every
time in demo 59; by the shape's name, none does much better than chance.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from omniforge.data.synthetic import scenes  # noqa: E402
from omniforge.data.synthetic.world import TILE, lookup_question, size_question  # noqa: E402
from omniforge.model.omni import OmniModel  # noqa: E402
from omniforge.processing.chat import OmniProcessor  # noqa: E402

GRID = 4
"""Pooled tokens a side of a single-tile image (64-px tile, 8-px patches, 2x2 pooling)."""


def questions(shape: scenes.Shape) -> dict[str, tuple[str, str]]:
    """Kind -> (question, the word in it that names the object)."""
    return {"What shape is <colour>? (by colour)": (lookup_question(shape, by_colour=True)[0], shape.colour),
            "What colour is the <shape>? (by shape)": (lookup_question(shape, by_colour=False)[0], shape.kind),
            "Is the <shape> big or small? (by shape)": (size_question(shape)[0], shape.kind)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a saved omniforge model (e.g. runs/demo/checkpoint)")
    parser.add_argument("--scenes", type=int, default=60, help="fresh scenes to ask about")
    parser.add_argument("--split", default="val", choices=("train", "val", "test"))
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = OmniModel.from_pretrained(args.checkpoint, ["llm.attention=eager"]).eval()  # SDPA returns no weights
    processor = OmniProcessor.from_model(model)
    image_id, tokenizer = model.token_ids["image"], processor.tokenizer
    rng = np.random.default_rng(args.seed)
    hits = defaultdict(list)  # (kind, where, layer, head) -> [looked hardest at the asked shape]
    chance = []
    for _ in range(args.scenes):
        shapes = scenes.scene(rng, args.split, int(rng.integers(2, 4)))
        image, cover = scenes.render(shapes, TILE, TILE, rng), scenes.coverage(shapes, TILE, GRID).T  # (shapes, tokens)
        for asked, shape in enumerate(shapes):
            chance.append(1 / len(shapes))
            for kind, (question, name) in questions(shape).items():
                encoded = processor.encode([{"role": "user", "content": f"<image>\n{question}"}], {"image": [image]},
                                           add_generation_prompt=True)
                batch = processor.collate([encoded])
                batch.pop("labels", None)
                ids, mask = batch.pop("input_ids"), batch.pop("attention_mask", None)
                with torch.no_grad():
                    out = model.llm(inputs_embeds=model.embed(ids, **batch), attention_mask=mask,
                                    output_attentions=True, use_cache=False)
                tokens = ids[0].tolist()
                images = [i for i, t in enumerate(tokens) if t == image_id]
                if len(images) != GRID * GRID:
                    raise ValueError(f"{args.checkpoint}: {len(images)} image tokens, expected {GRID * GRID} (one tile)")
                word = max(i for i, t in enumerate(tokens) if tokenizer.decode([t]).strip() == name)
                for where, position in (("at the word", word), ("answering", len(tokens) - 1)):
                    for layer, attention in enumerate(out.attentions):
                        weights = attention[0, :, position, images].numpy()  # (heads, image tokens)
                        density = weights @ cover.T / cover.sum(1)  # (heads, shapes): attention per covered pixel
                        for head, looked_at in enumerate(density.argmax(1)):
                            hits[kind, where, layer, head].append(looked_at == asked)
    print(f"{args.checkpoint}: {len(chance)} objects of {args.scenes} fresh {args.split}-split scenes; "
          f"chance {100 * np.mean(chance):.0f} %\n")
    print("| question | best head at the word naming the object | best head at the answer position |\n|---|---|---|")
    for kind in dict.fromkeys(key[0] for key in hits):
        cells = []
        for where in ("at the word", "answering"):
            rate, layer, head = max((np.mean(v), key[2], key[3]) for key, v in hits.items() if key[:2] == (kind, where))
            cells.append(f"{100 * rate:.0f} % (layer {layer}, head {head})")
        print(f"| {kind} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
