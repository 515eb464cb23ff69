"""Does the LLM find the object it is asked about? Every shape of fresh scenes of two or three
shapes is asked about by its colour ("What shape is <colour>?") and by its shape ("What colour
is the <shape>?", "Is the <shape> big or small?"). For every layer and head, at the word that
names the object and at the position that answers, we count how often that head pays the most
attention per covered pixel to the asked shape; the best head of each kind is printed beside
chance (one over the shape count). Beside it, what the LLM is given to find it by: linear probes
of the colour, shape and size of the shape under an image token, read off the LLM's input at that
token (trained on three quarters of `--probe-scenes` fresh scenes, scored on the rest), and how
plainly: the share of the input's variance that lies between the attribute's class means.

    python bench/attention.py runs/demo/checkpoint [--scenes 60] [--probe-scenes 400] [--split val] [--seed 3]

BENCHMARKS.md, session 19 item 7: a first-layer head at the colour word finds the object every
time in demo 59; by the shape's name, none does much better than chance. Session 20 item 1: yet
colour, shape and size are each read off the LLM's input at 99 % (size in 1-2 % of its variance).
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


def probe_accuracy(features: torch.Tensor, labels: list, train: int) -> float:
    """Held-out accuracy of a linear classifier (standardised features, full-batch Adam) fitted on
    the first `train` rows of features (N, D) and scored on the rest."""
    classes = sorted(set(labels))
    target = torch.tensor([classes.index(label) for label in labels])
    mean, std = features[:train].mean(0), features[:train].std(0) + 1e-6
    features = (features - mean) / std
    linear = torch.nn.Linear(features.shape[1], len(classes))
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(400):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(linear(features[:train]), target[:train]).backward()
        optimizer.step()
    with torch.no_grad():
        return (linear(features[train:]).argmax(1) == target[train:]).float().mean().item()


def variance_share(features: torch.Tensor, labels: list) -> float:
    """Share of the variance of features (N, D) that lies between the class means: how plainly, not
    whether, the features show the label."""
    centred = features - features.mean(0)
    means = {label: centred[[i for i, x in enumerate(labels) if x == label]].mean(0) for label in set(labels)}
    between = torch.stack([means[label] for label in labels])
    return (between.square().sum() / centred.square().sum()).item()


def probes(model: OmniModel, processor: OmniProcessor, rng: np.random.Generator, count: int,
           split: str) -> dict[str, tuple[float, float]]:
    """For each attribute of the shape under an image token (`scenes.cell_owners`, as the stand-in
    tower is labelled), from the LLM's input embeddings: a linear probe's held-out
    accuracy (%) and the share (%) of the embeddings' variance between the attribute's class means."""
    features, labels, train = [], [], 0
    for index in range(count):
        shapes = scenes.scene(rng, split, int(rng.integers(2, 4)))
        image, owners = scenes.render(shapes, TILE, TILE, rng), scenes.cell_owners(shapes, TILE, GRID)
        encoded = processor.encode([{"role": "user", "content": "<image>"}], {"image": [image]}, add_generation_prompt=True)
        batch = processor.collate([encoded])
        ids = batch["input_ids"]
        with torch.no_grad():
            embeds = model.embed(ids, pixel_values=batch["pixel_values"])[0, ids[0] == model.token_ids["image"]]
        for token in np.flatnonzero(owners >= 0):
            shape = shapes[owners[token]]
            features.append(embeds[token])
            labels.append({"colour": shape.colour, "shape": shape.kind, "size": shape.big})
        if index < count * 3 // 4:
            train = len(features)  # held-out tokens come from scenes the probe never saw
    stacked, found = torch.stack(features), {}
    for name in labels[0]:
        values = [label[name] for label in labels]
        found[name] = 100 * probe_accuracy(stacked, values, train), 100 * variance_share(stacked, values)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a saved omniforge model (e.g. runs/demo/checkpoint)")
    parser.add_argument("--scenes", type=int, default=60, help="fresh scenes to ask about")
    parser.add_argument("--probe-scenes", type=int, default=400, help="fresh scenes for the linear probes")
    parser.add_argument("--split", default="val", choices=("train", "val", "test"))
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = OmniModel.from_pretrained(args.checkpoint, ["llm.attention=eager"]).eval()  # SDPA returns no weights
    processor = OmniProcessor.from_model(model)
    image_id, tokenizer = model.token_ids["image"], processor.tokenizer
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)  # the probes' initial weights: the same figures run to run
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
    found = probes(model, processor, rng, args.probe_scenes, args.split)
    print(f"\nthe LLM's input at image tokens ({args.probe_scenes} scenes; linear probes scored on a quarter held out):")
    print("| attribute | linear probe | share of the variance |\n|---|---|---|")
    for name, (accuracy, share) in found.items():
        print(f"| {name} | {accuracy:.1f} % | {share:.1f} % |")


if __name__ == "__main__":
    main()
