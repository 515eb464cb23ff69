"""JSONL conversation files, weighted mixtures, and the deterministic sample stream of a stage.

The stream is a pure function of (datasets, weights, seed): position p always names the same
record, so resuming is "start at position p" and nothing is decoded to get there. Each dataset
is read in a fresh seeded permutation per epoch. A sample that fails to load (corrupt media,
placeholder mismatch, bad record) is skipped and counted, never a crash of the run; a dataset
whose samples keep failing is an error.
"""

from __future__ import annotations

import json
import os
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from omniforge.errors import ConfigError, DataError, OmniforgeError
from omniforge.processing.chat import ConversationError, Encoded, OmniProcessor


class JsonlConversations:
    """Random access to the records of a JSONL file (a byte-offset index, built once)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = self.path.name
        """How messages and skip counts name the file (a `Mixture` with two files of one name lengthens it)."""
        if not self.path.is_file():
            raise ConfigError(f"data: {self.path} is not a file")
        self.offsets = []
        with self.path.open("rb") as f:
            offset = 0
            for line in f:
                if line.strip():
                    self.offsets.append(offset)
                offset += len(line)
        if not self.offsets:
            raise ConfigError(f"data: {self.path} holds no records")

    def __len__(self) -> int:
        return len(self.offsets)

    def record(self, index: int) -> dict:
        with self.path.open("rb") as f:
            f.seek(self.offsets[index])
            line = f.readline()
        try:
            return json.loads(line)
        except ValueError as e:  # bad JSON, or bytes that are not UTF-8
            raise ConversationError(f"{self.path}[{index}]: invalid JSON ({getattr(e, 'msg', e)})") from None

    def where(self, index: int) -> str:
        return f"{self.name}[{index}]"


class Mixture:
    """Weighted, seeded, endless order of (dataset, record) pairs."""

    BLOCK = 4096

    def __init__(self, datasets: list[JsonlConversations], weights: list[float], seed: int):
        self.datasets, self.seed = datasets, seed
        if len({d.path.name for d in datasets}) < len(datasets):  # en/train.jsonl, zh/train.jsonl: by their folders
            common = os.path.commonpath([d.path.parent for d in datasets])
            for dataset in datasets:
                dataset.name = str(dataset.path.relative_to(common))
        total = float(sum(weights))
        self.probabilities = np.array([w / total for w in weights])
        self._permutations: dict[tuple[int, int], np.ndarray] = {}

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return self.order()

    def order(self, start: int = 0) -> Iterator[tuple[int, int]]:
        """(dataset, record) for positions start, start+1, ... (positions before are skipped cheaply)."""
        rng = np.random.default_rng([self.seed, 0])
        used = [0] * len(self.datasets)
        position = 0
        while True:
            for d in rng.choice(len(self.datasets), size=self.BLOCK, p=self.probabilities):
                epoch, index = divmod(used[d], len(self.datasets[d]))
                used[d] += 1
                if position >= start:
                    yield int(d), int(self._permutation(int(d), epoch)[index])
                position += 1

    def _permutation(self, dataset: int, epoch: int) -> np.ndarray:
        key = (dataset, epoch)
        if key not in self._permutations:
            if len(self._permutations) > 64:
                self._permutations.clear()
            self._permutations[key] = np.random.default_rng([self.seed, dataset + 1, epoch]).permutation(
                len(self.datasets[dataset]))
        return self._permutations[key]

    @property
    def size(self) -> int:
        """Records in one pass over every dataset."""
        return sum(len(d) for d in self.datasets)


@dataclass
class Positioned:
    """An encoded sample and where it sits in the stream."""

    position: int
    sample: Encoded
    file: str
    """The name of the dataset file it came from."""
    where: str
    """Its record, e.g. `ocr.jsonl[12]`."""


RECORD_ERRORS = (OmniforgeError, TypeError, KeyError, AttributeError, ValueError, IndexError)
"""What loading one record may raise: omniforge's errors, and, as a safety net, the errors a field
of an unexpected type or shape raises in code that indexes, calls and converts it."""


class SampleCache:
    """Encoded samples (media decoded, text tokenized) kept in memory up to `max_bytes`, the least
    recently read out first; keyed by file and record (evaluation: task and item), for one processor
    (one model's tokenizer and media settings), so it lives as long as one `train()` run and is
    shared by its stages (or by the demo's per-stage evaluations).

    Reading a sample is 15-20 % of a step of the demo, whose small world is read several times over
    across stages: 77 % of its reads served, 2.3 GiB held (BENCHMARKS.md, session 25); a corpus read
    about once gains nothing from it.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = self.hits = self.misses = 0
        self._samples: OrderedDict[tuple[str, int], tuple[Encoded, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._samples)

    def get(self, key: tuple[str, int]) -> Encoded | None:
        held = self._samples.get(key)
        if held is None:
            self.misses += 1
            return None
        self._samples.move_to_end(key)
        self.hits += 1
        return held[0]

    def put(self, key: tuple[str, int], sample: Encoded) -> None:
        size = encoded_bytes(sample)
        if key in self._samples or size > self.max_bytes:
            return
        self._samples[key] = sample, size
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, freed) = self._samples.popitem(last=False)
            self.bytes -= freed

    def summary(self) -> str:
        reads = self.hits + self.misses
        return (f"sample cache: {self.hits}/{reads} reads served ({100 * self.hits / max(reads, 1):.0f} %), "
                f"{len(self)} samples, {self.bytes / 2**30:.2f} GiB")


def encoded_bytes(sample: Encoded) -> int:
    """About what `sample` holds in memory: its media tensors, and 8 bytes a token for each id list."""
    tensors = [value for item in sample.media for value in vars(item).values() if torch.is_tensor(value)]
    return sum(t.nbytes for t in tensors) + 16 * len(sample)


class SampleStream:
    """Encoded samples of a mixture for one process: positions p with p % world == rank.

    Samples that fail to load are skipped; `skipped` counts them by file and reason
    (`ocr.jsonl: UnreadableMediaError`). A dataset whose last `FAILING_IN_A_ROW` samples read
    all failed raises `DataError`: its data is broken (a media folder moved, another format),
    not a few samples, and the run would otherwise go on with the other datasets alone.
    """

    FAILING_IN_A_ROW = 50
    """Reads are in shuffled order: a dataset that loads half of its samples fails 50 in a row with
    a chance of about 2**-50."""
    WARNINGS_PER_FILE = 5

    def __init__(self, mixture: Mixture, processor: OmniProcessor, start: int = 0, rank: int = 0, world: int = 1,
                 warn=print, cache: SampleCache | None = None):
        self.mixture, self.processor, self.cache = mixture, processor, cache
        self.rank, self.world, self.warn = rank, world, warn
        self.skipped: Counter[str] = Counter()
        self._iter = self._samples(start)

    def __iter__(self):
        return self._iter

    def __next__(self) -> Positioned:
        return next(self._iter)

    def count_skip(self, file: str, reason: str) -> None:
        self.skipped[f"{file}: {reason}"] += 1

    def _samples(self, start: int) -> Iterator[Positioned]:
        first = start + (self.rank - start) % self.world  # the first position of this rank's shard
        order = self.mixture.order(first)
        position = first
        failing = [0] * len(self.mixture.datasets)  # per dataset: its latest reads that all failed
        warned: Counter[str] = Counter()
        for d, index in order:
            if (position - self.rank) % self.world == 0:
                dataset = self.mixture.datasets[d]
                file, where = dataset.name, dataset.where(index)
                key = (str(dataset.path), index)
                try:
                    sample = self.cache.get(key) if self.cache is not None else None
                    if sample is None:
                        sample = self.processor.encode_record(dataset.record(index), base_dir=dataset.path.parent,
                                                              where=where)
                        if self.cache is not None:
                            self.cache.put(key, sample)
                except RECORD_ERRORS as e:
                    reason = str(e) if isinstance(e, OmniforgeError) else f"{type(e).__name__}: {e}"
                    reason = reason if where in reason else f"{where}: {reason}"
                    self.count_skip(file, type(e).__name__)
                    warned[file] += 1
                    if warned[file] <= self.WARNINGS_PER_FILE:
                        self.warn(f"skipped {reason}")
                    failing[d] += 1
                    if failing[d] >= self.FAILING_IN_A_ROW:
                        counts = {k: v for k, v in self.skipped.items() if k.startswith(f"{file}: ")}
                        raise DataError(f"{dataset.path}: its last {failing[d]} samples read all failed to load "
                                        f"(skipped so far: {counts}); the latest: {reason}") from None
                else:
                    failing[d] = 0
                    yield Positioned(position, sample, file, where)
            position += 1


def mean_sample_tokens(mixture: Mixture, processor: OmniProcessor, probe: int = 32) -> float | None:
    """Mean encoded length (tokens) of the mixture's first `probe` loadable samples (None: none load)."""
    stream = SampleStream(mixture, processor, warn=lambda _: None)
    lengths = [len(p.sample) for _, p in zip(range(probe), stream)]
    return float(np.mean(lengths)) if lengths else None


def open_mixture(specs, seed: int) -> Mixture:
    """The mixture of a stage's `data` list (`DatasetSpec`s)."""
    return Mixture([JsonlConversations(s.path) for s in specs], [s.weight for s in specs], seed)
