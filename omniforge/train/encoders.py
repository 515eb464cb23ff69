"""Stand-ins for the pretrained encoders: a SigLIP-style tower and a Whisper-style encoder,
pretrained on the synthetic world and saved as Hugging Face folders the micro model loads.

The real recipe starts from SigLIP and Whisper checkpoints: encoders that already see shapes
and hear words. A randomly initialised tower learns that only through the LLM's few answer
tokens, the slowest path there is at the micro scale (BENCHMARKS.md: with these stand-ins the
demo's video QA, spoken QA and WER all improve). So, just as the text warm-up stands in for
the pretrained LLM, this module pretrains each encoder with its own objective, on the world's
training side only (training (colour, shape) pairs, training voices):

- vision: scenes and words rendered on the fly by `omniforge.data.synthetic.scenes`;
  per pooled token, the colour, shape and size under it and that shape's place from the left
  (dense labels from a rendered label map); per image, only what no one token holds: the
  count and the word. No label says which shape has which colour: read off the mean of the
  tokens, such labels taught the tower to pack every (colour, shape) pair of a scene into a
  summary, which the LLM then read instead of finding the object asked about, and a held-out
  pair has no summary to be read by (BENCHMARKS.md, session 19).
  A share of the scenes (`recolour_fraction`; half in `recipes/micro_encoders.yaml`) is drawn
  in random colours and labelled for all but colour, so that the tower reads a shape whatever
  its colour: trained on the world's colours alone, it told the shape of a held-out pair's
  object (a yellow circle) at chance, from colour-bound features.
- audio: CTC over the world's own tokenizer on the training ASR speech (`train/asr.jsonl`).

    omniforge encoders --world runs/world          # -> runs/world/encoders/{vision,audio}/

`recipes/models/micro.yaml` loads them through the normal `vision.path` / `audio.path`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from omniforge.config import VisionConfig, from_dict, read_yaml, require
from omniforge.data.synthetic import scenes
from omniforge.data.synthetic.scenes import COLOURS, SHAPES, WORDS
from omniforge.errors import ConfigError
from omniforge.processing.counts import ENCODER_STRIDE

ENCODERS_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "micro_encoders.yaml"
QUICK_STEPS = 1 / 20
"""--quick trains this fraction of the steps (a smoke run: the path, not the accuracy)."""


@dataclass
class VisionPretraining:
    """The SigLIP stand-in: architecture and objective settings."""

    arch: dict[str, Any]
    """HF vision config kwargs with `model_type` (e.g. siglip_vision_model)."""
    tile_size: int = 64
    """Input side (px), the micro model's tile."""
    pool: int = 2
    """Pooling factor of the patch grid, as the micro model pools (dense labels are per pooled token)."""
    steps: int = 600
    """Optimizer steps (images are rendered afresh for each one)."""
    batch_size: int = 64
    """Images a step."""
    lr: float = 1e-3
    """Peak AdamW learning rate (warm-up, then cosine)."""
    word_fraction: float = 0.2
    """Share of rendered words (OCR) among the images; the rest are scenes of 1-3 shapes."""
    recolour_fraction: float = 0.0
    """Share of scenes drawn in random RGB colours instead of the world's, labelled for all but
    colour: shape is then read apart from colour, as an encoder pretrained on the world at large
    reads it, and the held-out (colour, shape) pairs' shapes are recognised."""
    frame_fraction: float = 0.0
    """Share of scenes that are a video frame instead: one big shape anywhere on a crossing clip's
    path (`scenes.crossing_shape`), so that a shape near the top or bottom of a frame, where
    still scenes never put one, reads as it does in the middle."""

    def validate(self, key: str) -> None:
        require(self.steps > 0 and self.batch_size > 0, f"{key}.steps", "steps and batch_size must be > 0")
        for name in ("recolour_fraction", "frame_fraction"):
            value = getattr(self, name)
            require(0 <= value <= 1, f"{key}.{name}", f"must be in [0, 1], got {value}")


@dataclass
class AudioPretraining:
    """The Whisper stand-in: architecture and CTC settings."""

    arch: dict[str, Any]
    """HF Whisper config kwargs (`model_type: whisper`)."""
    steps: int = 500
    """Optimizer steps over the training ASR utterances (sampled with replacement)."""
    batch_size: int = 32
    """Utterances a step."""
    lr: float = 2e-3
    """Peak AdamW learning rate (warm-up, then cosine)."""
    trim_seconds: float | None = None
    """Encode each utterance's audio only, rounded up to this many seconds, not its whole window
    (recorded in the saved tower's config; the model's `audio.trim_seconds` must say the same)."""
    speeds: list[float] = field(default_factory=lambda: [1.0])
    """Speed perturbation (Ko et al., 2015): every training utterance is also heard played this
    many times faster (resampled, so pitch moves with tempo), each copy drawn as often."""

    def validate(self, key: str) -> None:
        require(self.steps > 0 and self.batch_size > 0, f"{key}.steps", "steps and batch_size must be > 0")
        require(bool(self.speeds) and all(0.5 <= s <= 2 for s in self.speeds), f"{key}.speeds",
                f"need at least one speed factor, each in [0.5, 2], got {self.speeds}")
        require(self.trim_seconds is None or self.trim_seconds > 0, f"{key}.trim_seconds",
                f"must be > 0 seconds or null, got {self.trim_seconds}")


@dataclass
class EncoderPretraining:
    """`recipes/micro_encoders.yaml`: both stand-ins."""

    vision: VisionPretraining
    audio: AudioPretraining
    seed: int = 0
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01

    def validate(self, key: str) -> None:
        require(self.warmup_steps >= 0, f"{key}.warmup_steps", "must be >= 0")


def load_encoder_recipe(path: str | Path = ENCODERS_RECIPE) -> EncoderPretraining:
    return from_dict(EncoderPretraining, read_yaml(Path(path), "encoder pretraining recipe"), str(path))


def pretrain_encoders(world: str | Path, recipe: EncoderPretraining | None = None, quick: bool = False,
                      log=print, side_by_side: bool | None = None,
                      side_jobs: dict[str, tuple[Callable, tuple]] | None = None) -> dict[str, Any]:
    """Pretrain both stand-ins; writes `world/encoders/{vision,audio}/`; returns their held-out metrics.

    side_by_side: in two processes at once, each with half of torch's threads (default: when torch
    has two or more). Models this small use a second intra-op thread poorly (a step 1.3x faster on
    2 cores), two processes fully: 397 -> 264 s in the demo (BENCHMARKS.md, session 25). Each
    encoder seeds its own initialisation, so the result does not depend on the order either way.
    side_jobs: {name: (fn, args)} run after the encoders' jobs, side by side on the first process
    that is free (the vision tower finishes well before the audio encoder), their results returned
    under their names: the demo's PocketSphinx peer takes that idle core there, where beside the
    training loop it took a core the loop's threads need.
    """
    world = Path(world)
    for needed in ("tokenizer", "train/asr.jsonl", "val/asr.jsonl"):
        if not (world / needed).exists():
            raise ConfigError(f"{world}: no {needed}; is it a synthetic world? (write one with "
                              f"`omniforge synth --out {world}`)")
    recipe = recipe or load_encoder_recipe()
    scale = QUICK_STEPS if quick else 1.0
    jobs = {"vision": (pretrain_vision, (recipe, world / "encoders" / "vision", scale)),
            "audio": (pretrain_audio, (recipe, world, world / "encoders" / "audio", scale))}
    side_jobs = side_jobs or {}
    threads = torch.get_num_threads()
    if not (threads >= 2 if side_by_side is None else side_by_side):
        return {**{name: job(*args, log=log) for name, (job, args) in jobs.items()},
                **{name: job(*args) for name, (job, args) in side_jobs.items()}}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: a forked child of a process whose OpenMP pool has started can hang in it
    with ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(max(1, threads // len(jobs)),)) as pool:
        futures = {name: pool.submit(_with_log_lines, job, *args) for name, (job, args) in jobs.items()}
        side_futures = {name: pool.submit(job, *args) for name, (job, args) in side_jobs.items()}
        results = {}
        for name, future in futures.items():
            results[name], lines = future.result()
            for line in lines:
                log(line)
        return {**results, **{name: future.result() for name, future in side_futures.items()}}


def _with_log_lines(job, *args) -> tuple[Any, list[str]]:
    """`job(*args)` in a worker process, with what it logs returned to the parent."""
    lines: list[str] = []
    return job(*args, log=lines.append), lines


# --------------------------------------------------------------------------- vision


class _SceneSampler:
    """Images rendered on the fly from one side of the world (`scenes.pairs(split)`), with their labels;
    `recolour_fraction` of the scenes in random colours (`VisionPretraining.recolour_fraction`)."""

    def __init__(self, spec: VisionPretraining, grid: int, seed: int, split: str = "train", recolour_fraction: float = 0.0):
        from omniforge.processing.image import ImageProcessor

        self.spec, self.grid, self.split, self.recolour_fraction = spec, grid, split, recolour_fraction
        self.rng = np.random.default_rng(seed)
        self.processor = ImageProcessor(spec.tile_size, max_tiles=1)

    def batch(self, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """pixel_values (n, 3, T, T) and labels (ignored entries are -100)."""
        images, labels = zip(*(self.sample() for _ in range(n)))
        pixels = torch.cat([self.processor(image).pixel_values for image in images])
        return pixels, {key: torch.tensor([label[key] for label in labels]) for key in labels[0]}

    def sample(self):
        """One image and its labels: a rendered word, a video frame or a scene of 1-3 shapes."""
        t, rng, cells = self.spec.tile_size, self.rng, self.grid * self.grid
        labels = {name: [-100] * cells if _per_token(name) else -100 for name in _LABELS}
        if rng.random() < self.spec.word_fraction:
            word = int(rng.integers(len(WORDS)))
            image = scenes.word_image(WORDS[word], t, t, rng)  # as OCR and each tile of a hi-res image show it
            return image, {**labels, "word": word + 1}
        if self.spec.frame_fraction > 0 and rng.random() < self.spec.frame_fraction:  # at 0, the draws of before
            shapes = [scenes.crossing_shape(*scenes.random_crossing(rng, self.split), float(rng.random()))]
        else:
            shapes = scenes.scene(rng, self.split, int(rng.integers(1, 4)))
        recoloured = self.recolour_fraction > 0 and rng.random() < self.recolour_fraction
        image = scenes.render(shapes, t, t, rng, [scenes.random_fill(rng) for _ in shapes] if recoloured else None)
        labels.update(word=0, count=len(shapes), **{name: [0] * cells for name in _LABELS if _per_token(name)})
        order = sorted(range(len(shapes)), key=lambda i: shapes[i].x)
        owners = scenes.cell_owners(shapes, t, self.grid)
        for cell in np.flatnonzero(owners >= 0):
            index = int(owners[cell])
            owner = shapes[index]
            labels["cell_colour"][cell] = list(COLOURS).index(owner.colour) + 1
            labels["cell_kind"][cell] = SHAPES.index(owner.kind) + 1
            labels["cell_size"][cell] = int(owner.big) + 1
            labels["cell_order"][cell] = order.index(index) + 1
        if recoloured:  # none of the world's colours: colour is not labelled
            labels["cell_colour"] = [-100] * cells
        return image, labels


_LABELS = {"cell_colour": len(COLOURS) + 1, "cell_kind": len(SHAPES) + 1, "cell_size": 3, "cell_order": 4,
           "word": len(WORDS) + 1, "count": 4}
"""Classes per label; 0 is "none" (background under a token, no word). The `cell_` labels are per
pooled token: the colour, kind, size (small, big) of the shape under it, and its place counted
from the left (1-3); the others per image: the word, the count (1-3)."""


def _per_token(name: str) -> bool:
    return name.startswith("cell_")


class _VisionHeads(nn.Module):
    """Linear read-outs: per pooled token (`cell_` labels) and per image (the mean of the tokens)."""

    def __init__(self, dim: int):
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Linear(dim, n) for name, n in _LABELS.items()})

    def logits(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """tokens (N, L, D) -> {label: (N, L, classes) per token or (N, classes) per image}."""
        pooled = tokens.mean(1)
        return {name: head(tokens if _per_token(name) else pooled) for name, head in self.heads.items()}

    def loss(self, tokens: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of the cross-entropies of every label the batch has (a batch of scenes has no word)."""
        return sum(F.cross_entropy(logits.flatten(0, -2), labels[name].flatten(), ignore_index=-100)
                   for name, logits in self.logits(tokens).items() if (labels[name] != -100).any())

    @torch.no_grad()
    def accuracy(self, tokens: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
        """Per label, over labelled entries (dense ones: only cells a shape covers)."""
        scores = {}
        for name, logits in self.logits(tokens).items():
            target = labels[name]
            keep = target > 0 if _per_token(name) or name == "word" else target != -100
            scores[name] = round(100 * (logits.argmax(-1) == target)[keep].float().mean().item(), 1)
        return scores


def pretrain_vision(recipe: EncoderPretraining, out: Path, scale: float = 1.0, log=print) -> dict[str, float]:
    """Train the tower on rendered scenes and words; save it to `out` (HF folder); held-out accuracies."""
    from omniforge.model.omni import PREPROCESSOR_FILE
    from omniforge.model.vision import VisionEncoder
    from omniforge.processing.counts import pooled_grid
    from omniforge.processing.image import SIGLIP_MEAN, SIGLIP_STD

    spec = recipe.vision
    torch.manual_seed(recipe.seed)
    config = from_dict(VisionConfig, {"arch": spec.arch, "tile_size": spec.tile_size, "pool": spec.pool})
    encoder = VisionEncoder.from_config(config, torch.float32)
    heads = _VisionHeads(encoder.hidden_size)
    sampler = _SceneSampler(spec, pooled_grid(encoder.grid, encoder.pool), recipe.seed, recolour_fraction=spec.recolour_fraction)
    steps = max(1, round(spec.steps * scale))

    def step() -> torch.Tensor:
        pixels, labels = sampler.batch(spec.batch_size)
        return heads.loss(encoder(pixels), labels)

    _fit(encoder, heads, recipe, spec.lr, steps, step, "vision", log)
    scores = _scores(encoder, heads, _SceneSampler(spec, sampler.grid, recipe.seed + 1))  # fresh images
    held_out = _scores(encoder, heads, _SceneSampler(spec, sampler.grid, recipe.seed + 2, split="held_out"))
    scores.update({f"{name}, held-out pairs": held_out[name] for name in ("cell_colour", "cell_kind")})
    log(f"  vision stand-in, accuracy % on fresh images: {scores}")
    encoder.tower.save_pretrained(out)
    (out / PREPROCESSOR_FILE).write_text(json.dumps({"image_mean": list(SIGLIP_MEAN), "image_std": list(SIGLIP_STD),
                                                      "size": {"height": spec.tile_size, "width": spec.tile_size}}))
    return scores


def _scores(encoder, heads: "_VisionHeads", sampler: _SceneSampler) -> dict[str, float]:
    pixels, labels = sampler.batch(512)
    with torch.no_grad():
        return heads.accuracy(encoder(pixels), labels)


# --------------------------------------------------------------------------- audio


def pretrain_audio(recipe: EncoderPretraining, world: Path, out: Path, scale: float = 1.0, log=print) -> dict[str, float]:
    """CTC-train the encoder on `world/train/asr.jsonl` over the world's tokenizer; save it to `out`
    with its CTC head (`audio.ctc_posteriors` reads it); greedy CTC WER (%) on `world/val/asr.jsonl`."""
    from transformers import AutoTokenizer
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from omniforge.model.audio import AudioEncoder, save_ctc_head
    from omniforge.model.loading import hf_config

    spec = recipe.audio
    torch.manual_seed(recipe.seed)
    audio = AudioEncoder(WhisperEncoder(hf_config(None, spec.arch, "audio")), trim_seconds=spec.trim_seconds)
    encoder = audio.encoder
    tokenizer = AutoTokenizer.from_pretrained(world / "tokenizer", local_files_only=True)
    train = transcribed_utterances(world / "train" / "asr.jsonl", audio, tokenizer, log, speeds=spec.speeds)
    val = transcribed_utterances(world / "val" / "asr.jsonl", audio, tokenizer, log)
    blank = len(tokenizer)
    head = nn.Linear(encoder.config.d_model, blank + 1)
    rng = np.random.default_rng(recipe.seed)

    def step() -> torch.Tensor:
        batch = [train[i] for i in rng.integers(len(train), size=spec.batch_size)]
        scores, lengths = _ctc_log_probs(audio, head, batch)
        targets = torch.cat([torch.tensor(u.ids) for u in batch])
        return F.ctc_loss(scores.transpose(0, 1), targets, lengths, torch.tensor([len(u.ids) for u in batch]),
                          blank=blank, zero_infinity=True)

    _fit(encoder, head, recipe, spec.lr, max(1, round(spec.steps * scale)), step, "audio", log)
    result = {"ctc_wer": round(ctc_wer(audio, head, val, tokenizer), 1)}
    log(f"  audio stand-in, greedy CTC on {len(val)} validation utterances: {result['ctc_wer']} % WER")
    encoder.config.pretrained_trim_seconds = spec.trim_seconds  # AudioEncoder.from_config checks the model's
    encoder.save_pretrained(out)
    save_ctc_head(out, head.weight, head.bias)
    return result


def _ctc_log_probs(audio, head, utterances: list[Utterance]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, frames, classes) log-probabilities of `head` over the encoded utterances, and (N,) their
    lengths in encoder frames (the CTC input lengths)."""
    valid = torch.tensor([u.valid_frames for u in utterances])
    hidden = audio.encode(torch.stack([u.features for u in utterances]), valid)
    return head(hidden).log_softmax(-1), valid // ENCODER_STRIDE


@torch.no_grad()
def ctc_wer(audio, head, utterances: list[Utterance], tokenizer) -> float:
    """Corpus WER (%) of greedy CTC decoding through `head` (hidden -> vocabulary + blank, the
    blank last) on transcribed utterances (`transcribed_utterances`)."""
    from omniforge.eval.metrics import wer

    scores, lengths = _ctc_log_probs(audio, head, utterances)
    blank = scores.shape[-1] - 1
    hypotheses = [tokenizer.decode(_ctc_greedy(s[:n], blank)) for s, n in zip(scores, lengths.tolist())]
    return wer(hypotheses, [u.text for u in utterances])


@dataclass
class Utterance:
    features: torch.Tensor
    """(n_mels, window_frames) log-mel of the one window the utterance fits in."""
    valid_frames: int
    """Mel frames that hold speech (half as many encoder frames: the CTC input length)."""
    ids: list[int]
    text: str


def transcribed_utterances(file: Path, audio, tokenizer, log,
                           speeds: tuple[float, ...] | list[float] = (1.0,)) -> list[Utterance]:
    """Transcribed utterances of an ASR file, each played at every one of `speeds` (1.0: as
    recorded); longer than one encoder window: skipped and counted."""
    from omniforge.processing.audio import SAMPLE_RATE, AudioProcessor, load_audio, resample

    window = audio.geometry.window_frames
    processor = AudioProcessor(audio.num_mel_bins, window_frames=window)
    found, skipped = [], 0
    for line in file.read_text().splitlines():
        record = json.loads(line)
        waveform = load_audio(file.parent / record["audios"][0])
        text = record["messages"][-1]["content"]
        ids = tokenizer(text)["input_ids"]  # every speed says the same words
        for speed in speeds:  # k times faster: the samples of k seconds played in one
            played = waveform if speed == 1 else resample(waveform, round(SAMPLE_RATE * speed), SAMPLE_RATE)
            features = processor(played)
            if len(features.valid_frames) > 1:
                skipped += 1
                continue
            found.append(Utterance(features.features[0], int(features.valid_frames[0]), ids, text))
    if skipped:
        log(f"  {file}: {skipped} utterances longer than one {window // 100}-s window skipped")
    return found


def _ctc_greedy(log_probs: torch.Tensor, blank: int) -> list[int]:
    """Best path: argmax per frame, repeats merged, blanks dropped."""
    best = log_probs.argmax(-1).tolist()
    return [t for i, t in enumerate(best) if t != blank and (i == 0 or t != best[i - 1])]


def _fit(encoder: nn.Module, heads: nn.Module, recipe: EncoderPretraining, lr: float, steps: int, step,
         name: str, log) -> None:
    """AdamW with the training loop's warm-up and cosine decay over `steps` calls of `step()` (which
    returns the loss)."""
    from tqdm import tqdm

    from omniforge.train.loop import adamw, warmup_cosine

    params = list(encoder.parameters()) + list(heads.parameters())
    optimizer = adamw(params, lr=lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(min(recipe.warmup_steps, steps // 4), steps, recipe.min_lr_ratio))
    encoder.train()
    progress = tqdm(range(steps), desc=f"pretraining the {name} encoder", leave=False)
    for _ in progress:
        loss = step()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    progress.close()
    encoder.eval()
    log(f"  {name} stand-in: {steps} steps, final loss {loss.item():.3f}")
