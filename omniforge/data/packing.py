"""Micro-batches from a sample stream: packed to a token budget, or padded.

Packing fills each row of `budget` tokens with whole samples in stream order (media tokens
count, since placeholders are already expanded). Attention stays inside each sample: the
position ids restart at 0 for every sample, which `transformers` turns into a block-diagonal
causal mask (SDPA) or variable-length attention (FlashAttention). Media items stay in order,
so each one is scattered into its own sample. A sample longer than the budget is an error,
or skipped and counted — never truncated through its placeholders.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omniforge.data.dataset import Positioned, SampleStream
from omniforge.errors import OmniforgeError
from omniforge.processing.chat import IGNORE, Encoded, OmniProcessor, collate_media


class SampleTooLongError(OmniforgeError, ValueError):
    """A sample does not fit the packing budget."""


@dataclass
class MicroBatch:
    inputs: dict[str, torch.Tensor]
    """`OmniModel` keyword arguments, labels included."""
    resume_at: int
    """Stream position this process restarts from to continue right after this batch."""
    tokens: int
    """Real (non-padding) tokens."""
    capacity: int
    """Tokens the batch tensors hold (rows x length)."""
    samples: int

    @property
    def padding_waste(self) -> float:
        return 1.0 - self.tokens / self.capacity

    @property
    def labelled(self) -> int:
        """Tokens that carry a loss (targets of the next-token prediction)."""
        return int((self.inputs["labels"][:, 1:] != IGNORE).sum())


class PackedBatches:
    """Micro-batches of `rows` rows, each `budget` tokens of whole samples."""

    def __init__(self, stream: SampleStream, processor: OmniProcessor, budget: int, rows: int = 1,
                 skip_long: bool = False):
        self.stream, self.processor, self.budget, self.rows, self.skip_long = stream, processor, budget, rows, skip_long
        self.carry: Positioned | None = None

    def __iter__(self):
        return self

    def __next__(self) -> MicroBatch:
        rows: list[list[Encoded]] = []
        last = None
        while len(rows) < self.rows:
            row, used = [], 0
            while True:
                item = self.carry or self._next_fitting()
                self.carry = None
                if item is None:
                    break
                if used + len(item.sample) > self.budget:
                    self.carry = item
                    break
                row.append(item.sample)
                used += len(item.sample)
                last = item
            if not row:
                break
            rows.append(row)
        if not rows:
            raise StopIteration
        resume_at = self.carry.position if self.carry else last.position + 1
        inputs = collate_packed(rows, self.processor.tokenizer.pad_token_id, self.budget)
        tokens = sum(len(s) for row in rows for s in row)
        return MicroBatch(inputs, resume_at, tokens, len(rows) * self.budget, sum(map(len, rows)))

    def _next_fitting(self) -> Positioned | None:
        too_long = 0
        for item in self.stream:
            if len(item.sample) <= self.budget:
                return item
            message = (f"sample {item.where} (stream position {item.position}) has {len(item.sample)} tokens, more "
                       f"than the packing budget of {self.budget} (raise batch_tokens, lower max_tiles, or set "
                       f"train.skip_long_samples)")
            if not self.skip_long:
                raise SampleTooLongError(message)
            self.stream.count_skip(item.file, "SampleTooLong")
            too_long += 1
            if too_long >= self.stream.mixture.size:
                raise SampleTooLongError(f"the last {too_long} samples were all too long; the latest: {message}")
        return None


class PaddedBatches:
    """Micro-batches of `batch_size` samples, right-padded to the longest."""

    def __init__(self, stream: SampleStream, processor: OmniProcessor, batch_size: int):
        self.stream, self.processor, self.batch_size = stream, processor, batch_size

    def __iter__(self):
        return self

    def __next__(self) -> MicroBatch:
        items = [item for _, item in zip(range(self.batch_size), self.stream)]
        if not items:
            raise StopIteration
        inputs = self.processor.collate([i.sample for i in items])
        tokens = int(inputs["attention_mask"].sum())
        return MicroBatch(inputs, items[-1].position + 1, tokens, inputs["input_ids"].numel(), len(items))


def collate_packed(rows: list[list[Encoded]], pad_id: int, budget: int) -> dict[str, torch.Tensor]:
    """(rows, budget) input_ids / labels / position_ids (restarting per sample) and the media.

    No attention_mask: the restarts in position_ids define the blocks (transformers builds the
    block-diagonal mask from them), and cu_seq_lens_q/k give the same boundaries over the
    flattened batch for variable-length kernels. The padding tail is a block of its own with
    no labels.
    """
    ids = torch.full((len(rows), budget), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    positions = torch.zeros_like(ids)
    bounds = [0]
    for r, row in enumerate(rows):
        offset = 0
        for sample in row:
            n = len(sample)
            bounds.append(r * budget + offset + n)
            ids[r, offset:offset + n] = torch.tensor(sample.input_ids)
            labels[r, offset:offset + n] = torch.tensor(sample.labels)
            labels[r, offset] = IGNORE  # never a target of the previous sample's last token
            positions[r, offset:offset + n] = torch.arange(n)
            offset += n
        positions[r, offset:] = torch.arange(budget - offset)
        if offset < budget:
            bounds.append((r + 1) * budget)
    media = collate_media([item for row in rows for sample in row for item in sample.media])
    cu = torch.tensor(bounds, dtype=torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return {"input_ids": ids, "labels": labels, "position_ids": positions, **media,
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


class Prefetch:
    """Builds the next micro-batches in a background thread while the model trains on this one.

    Decoding images, video and audio releases the GIL, so it overlaps with the step. Errors
    raised while building a batch surface on the consumer's `next()`.
    """

    def __init__(self, batches, depth: int = 2):
        import queue
        import threading

        self._queue: "queue.Queue" = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(batches,), daemon=True)
        self._thread.start()

    def _fill(self, batches) -> None:
        try:
            for batch in batches:
                if not self._put(batch):
                    return
            self._put(StopIteration())
        except BaseException as e:  # noqa: BLE001  (re-raised in the consumer)
            self._put(e)

    def _put(self, item) -> bool:
        """Queue `item` unless `close()` was called meanwhile (then False)."""
        import queue

        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def close(self) -> None:
        """Stop the thread (at the end of a stage, which rarely drains it) and drop its batches."""
        self._stop.set()
        self._thread.join()

    def __iter__(self):
        return self

    def __next__(self) -> MicroBatch:
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._queue.put(item)  # later calls see the same end
            raise item
        return item
