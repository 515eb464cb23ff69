"""Decoding with a KV cache: greedy or sampled, streamed, with stop tokens and stop strings.

    for deltas in stream(model, input_ids, attention_mask, config=GenerationConfig(...)):
        print(deltas[0], end="")          # the text each sequence gained this step

`generate` runs the same loop to completion and returns one `Completion` per sequence.
Batches are left-padded (attention_mask 0 on the left); positions count real tokens only.
With `contrast` > 0 every sequence is also decoded against a blank picture (visual contrastive
decoding), which takes away what the question alone makes likely. With `ctc_weight` > 0,
transcripts (what a spoken query was heard as; with `transcribe`, the whole answer) are decoded
jointly with the audio tower's CTC head (`omniforge.model.ctc_fusion`).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Iterator

import torch

from omniforge.config import require
from omniforge.model.ctc_fusion import TranscriptFusion
from omniforge.model.omni import OmniModel
from omniforge.model.tokenizer import CHATML_END

PICTURES = ("pixel_values", "pixel_values_videos")
"""The media arguments `GenerationConfig.contrast` blanks."""


@dataclass
class GenerationConfig:
    """How to pick each next token and when to stop."""

    max_new_tokens: int = 256
    """Most tokens generated per sequence."""
    temperature: float = 0.0
    """Softmax temperature; 0 picks the most likely token (greedy)."""
    top_k: int = 0
    """Sample only among the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Sample only among the most likely tokens whose probabilities sum to p (nucleus)."""
    repetition_penalty: float = 1.0
    """>1 makes tokens already in the sequence less likely (CTRL-style: logit / p or * p)."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a sequence; the text returned stops before them."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end a sequence, besides the tokenizer's end-of-sequence token."""
    seed: int | None = None
    """Seed of the sampler's own random generator (None: torch's global one)."""
    use_cache: bool = True
    """Reuse keys/values of earlier positions; False recomputes the whole sequence each step."""
    contrast: float = 0.0
    """Visual contrastive decoding (Leng et al., 2023): pick from (1 + contrast)·logits with the
    images and video minus contrast·logits with blank ones instead, so that what the text alone
    predicts (an answer prior) counts less than what the pixels show; 0 turns it off. Doubles
    the decoding work of a batch with pictures; a batch without any is decoded as usual."""
    plausibility: float = 0.1
    """With `contrast`: only tokens at least this fraction as likely as the most likely one (with
    the pictures) may be picked, so the contrast cannot promote a token the model rules out."""
    ctc_weight: float = 0.0
    """Joint CTC/attention decoding of transcripts (`omniforge.model.ctc_fusion`): while a sequence
    says what it heard of a spoken query (or, with `transcribe`, throughout its answer), each token
    is picked by (1 - w)·LLM + w·CTC prefix score of the prompt's last audio, read by the audio
    tower's CTC head; 0 turns it off. Needs `audio.ctc_posteriors`."""
    transcribe: bool = False
    """The answers are transcripts of the prompt's last audio (ASR): `ctc_weight` applies from the
    answer's state token to its end, not only inside `heard` spans."""

    def __post_init__(self) -> None:
        require(self.max_new_tokens >= 0, "max_new_tokens", f"must be >= 0, got {self.max_new_tokens}")
        require(self.top_k >= 0 and 0 < self.top_p <= 1, "top_k/top_p",
                f"need top_k >= 0 and 0 < top_p <= 1, got {self.top_k} and {self.top_p}")
        require(self.repetition_penalty > 0, "repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        require(self.contrast >= 0 and 0 < self.plausibility <= 1, "contrast/plausibility",
                f"need contrast >= 0 and 0 < plausibility <= 1, got {self.contrast} and {self.plausibility}")
        require(0 <= self.ctc_weight < 1, "ctc_weight", f"must be in [0, 1), got {self.ctc_weight}")


@dataclass
class Completion:
    text: str
    """The answer, ending before a stop string or stop token."""
    token_ids: list[int]
    """The ids generated, without a stop token; a stop string's own tokens stay (a token may hold
    the string and text before it, so the ids cannot end exactly where `text` does)."""
    finish_reason: str
    """"stop" (stop token or string) or "length" (max_new_tokens reached)."""
    heard: str | None = None
    """What the model said it heard of a spoken query (between the `heard` tokens, before its
    answer); not part of `text`. None when it said nothing of it."""


@torch.no_grad()
def stream(model: OmniModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
           config: GenerationConfig | None = None, completions: list[Completion] | None = None,
           **media) -> Iterator[list[str]]:
    """Yield, after every decoding step, the new text of each sequence ("" when none).

    input_ids: (B, L) left-padded, placeholders expanded; media: as for `OmniModel.embed`.
    Pass a list as `completions` to receive the final `Completion`s when the stream ends.
    """
    config = config or GenerationConfig()
    tokenizer = model.tokenizer
    batch, device = input_ids.shape[0], input_ids.device  # every tensor of the loop lives where the logits do
    if attention_mask is not None and not attention_mask[:, -1].all():
        rows = (attention_mask[:, -1] == 0).nonzero().flatten().tolist()
        raise ValueError(f"generate needs left-padded input, but attention_mask rows {rows} end in padding: "
                         "collate(..., padding_side='left')")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.clone()
    stop_ids = torch.tensor(stop_token_ids(model, config), dtype=torch.long, device=device)
    rng = None if config.seed is None else torch.Generator(device=device).manual_seed(config.seed)
    vocab = tokenizer.get_vocab()
    heard_ids = (vocab.get(model.config.tokens.heard), vocab.get(model.config.tokens.heard_end))
    texts = [_TextState(config.stop, heard_ids) for _ in range(batch)]
    generated = torch.empty(batch, 0, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    reasons = ["length"] * batch
    seen = input_ids.masked_fill(mask == 0, -1)  # tokens the repetition penalty counts

    prompt_embeds = model.embed(input_ids, **media)
    contrast = config.contrast > 0 and any(media.get(k) is not None for k in PICTURES)
    copies = 2 if contrast else 1  # rows decoded per sequence
    if contrast:  # a copy of each sequence with blank pictures (zeros: the tower's mean colour) is
                  # decoded beside it, as rows B..2B-1
        blank = {k: torch.zeros_like(v) if k in PICTURES and v is not None else v for k, v in media.items()}
        prompt_embeds = torch.cat([prompt_embeds, model.embed(input_ids, **blank)])
        mask = mask.repeat(copies, 1)
    fusion = _transcript_fusion(model, input_ids, config, media, stop_ids.tolist())
    llm, embed_tokens = model.llm, model.llm.get_input_embeddings()
    parameters = inspect.signature(llm.forward).parameters
    cache = "cache" if "cache" in parameters else "past_key_values"  # 5.24 renamed it
    # only the last position's logits are used: the LM head skips the (L, vocab) rest of the prompt
    last_logits = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    for step in range(config.max_new_tokens):  # one LLM call per token: none after the last
        if step == 0:
            out = llm(inputs_embeds=prompt_embeds, attention_mask=mask, position_ids=positions,
                      use_cache=config.use_cache, **last_logits)
        else:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            if config.use_cache:
                out = llm(input_ids=generated[:, -1:].repeat(copies, 1), attention_mask=mask, position_ids=positions,
                          use_cache=True, **{cache: getattr(out, cache)})
            else:
                full = torch.cat([prompt_embeds, embed_tokens(generated.repeat(copies, 1))], dim=1)
                out = llm(inputs_embeds=full, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                          use_cache=False, **last_logits)
        logits = out.logits[:, -1].float()
        if contrast:
            logits = contrasted(logits[:batch], logits[batch:], config)
        if fusion is not None:
            logits = fusion.adjust(logits)
        token = sample(logits, seen, config, rng)
        token = torch.where(finished, torch.full_like(token, tokenizer.pad_token_id), token)
        if fusion is not None:
            fusion.update(token, finished)
        generated = torch.cat([generated, token[:, None]], dim=1)
        seen = torch.cat([seen, token[:, None]], dim=1)
        hit_stop_token = torch.isin(token, stop_ids) & ~finished
        deltas = []
        for i in range(batch):
            if finished[i]:
                deltas.append("")
                continue
            ids = generated[i].tolist()
            delta, hit_string = texts[i].update(tokenizer, ids[:-1] if hit_stop_token[i] else ids,
                                                final=bool(hit_stop_token[i]))
            deltas.append(delta)
            if hit_stop_token[i] or hit_string:
                finished[i] = True
                reasons[i] = "stop"
        yield deltas
        if finished.all():
            break
    else:  # out of budget: release text held back as a possible start of a stop string
        yield ["" if finished[i] else texts[i].update(tokenizer, generated[i].tolist(), final=True)[0]
               for i in range(batch)]
    if completions is not None:
        for i in range(batch):
            ids = generated[i].tolist()
            keep = texts[i].token_count if reasons[i] == "stop" else len(ids)
            completions.append(Completion(texts[i].emitted, ids[:keep], reasons[i], texts[i].heard))


def stop_token_ids(model: OmniModel, config: GenerationConfig) -> list[int]:
    """Ids that end a sequence: the tokenizer's end-of-sequence token, the LLM's own (its generation
    config: an instruct model may end turns with a token that is not the tokenizer's eos), ChatML's
    end of turn when the vocabulary has it, and `config.stop_token_ids`."""
    tokenizer = model.tokenizer
    llm_eos = getattr(getattr(model.llm, "generation_config", None), "eos_token_id", None)
    llm_ids = [llm_eos] if isinstance(llm_eos, int) else list(llm_eos or [])
    ids = {tokenizer.eos_token_id, tokenizer.get_vocab().get(CHATML_END), *llm_ids, *config.stop_token_ids}
    return sorted(ids - {None})


def generate(model: OmniModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             config: GenerationConfig | None = None, **media) -> list[Completion]:
    """Decode every sequence to the end; one `Completion` per row of `input_ids`."""
    completions: list[Completion] = []
    for _ in stream(model, input_ids, attention_mask, config, completions, **media):
        pass
    return completions


def _transcript_fusion(model: OmniModel, input_ids: torch.Tensor, config: GenerationConfig, media: dict,
                       stop_ids: list[int]) -> TranscriptFusion | None:
    """The CTC fusion of `config.ctc_weight` for this batch; None when off or no prompt has audio."""
    if config.ctc_weight == 0 or media.get("audio_features") is None:
        return None
    log_probs, lengths = model.last_audio_ctc(input_ids, media["audio_features"], media["audio_valid_frames"])
    vocab, tokens = model.tokenizer.get_vocab(), model.config.tokens
    if config.transcribe:  # the answer itself, from the state token that opens it
        openings, endings = [vocab.get(tokens.state_text), vocab.get(tokens.state_speech)], stop_ids
    else:
        openings, endings = [vocab.get(tokens.heard)], [vocab.get(tokens.heard_end)]
    if None in openings + endings:
        raise ValueError(f"ctc_weight: the tokenizer lacks the tokens that open and close a transcript "
                         f"({tokens.state_text}, {tokens.state_speech}, {tokens.heard}, {tokens.heard_end})")
    return TranscriptFusion(log_probs.to(input_ids.device), lengths.to(input_ids.device), config.ctc_weight,
                            openings, endings)


def contrasted(logits: torch.Tensor, blank_logits: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """(B, V) logits with the pictures and with blank ones -> (B, V) log-probabilities to pick from:
    (1 + contrast)·with - contrast·blank, over the tokens that `plausibility` keeps (the rest -inf)."""
    with_pictures, blank = logits.log_softmax(-1), blank_logits.log_softmax(-1)
    plausible = with_pictures >= with_pictures.max(-1, keepdim=True).values + math.log(config.plausibility)
    mixed = (1 + config.contrast) * with_pictures - config.contrast * blank
    return mixed.masked_fill(~plausible, float("-inf"))


def sample(logits: torch.Tensor, seen: torch.Tensor, config: GenerationConfig,
           rng: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token of each row. logits: (B, V); seen: (B, S) earlier ids, -1 = none."""
    if config.repetition_penalty != 1.0:
        counts = torch.zeros_like(logits, dtype=torch.long).scatter_add_(1, seen.clamp(min=0), (seen >= 0).long())
        penalised = torch.where(logits > 0, logits / config.repetition_penalty, logits * config.repetition_penalty)
        logits = torch.where(counts > 0, penalised, logits)
    if config.temperature <= 0:
        return logits.argmax(-1)
    logits = logits / config.temperature
    if config.top_k > 0:
        kth = logits.topk(min(config.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= config.top_p  # keeps the token crossing p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=rng).squeeze(1)


class _TextState:
    """Incremental detokenisation of one sequence, holding back what may start a stop string and
    keeping what the model says it heard (between the `heard` tokens) apart from its answer."""

    def __init__(self, stops: list[str], heard_ids: tuple[int | None, int | None] = (None, None)):
        self.stops = [s for s in stops if s]
        self.heard_ids = heard_ids
        self.emitted = ""
        self.heard: str | None = None
        self.token_count = 0

    def update(self, tokenizer, ids: list[int], final: bool) -> tuple[str, bool]:
        """Decode `ids` (all generated so far); return (new text to show, stop string hit).

        final: the sequence ends here, so nothing is held back.
        """
        self.token_count = len(ids)
        opening, closing = self.heard_ids
        if opening is not None and opening in ids:  # the answer is what comes after the heard span
            start = ids.index(opening)
            end = ids.index(closing, start) if closing in ids[start:] else len(ids)
            self.heard = tokenizer.decode(ids[start + 1:end], skip_special_tokens=True).strip()
            ids = ids[:start] + ids[end + 1:]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:  # a multi-byte character is still incomplete
            return "", False
        for stop in self.stops:
            at = text.find(stop, max(0, len(self.emitted) - len(stop)))
            if at != -1:
                return self._emit(text[:at]), True
        if final:
            return self._emit(text), False
        safe = len(text) - max((_overlap(text, s) for s in self.stops), default=0)
        return self._emit(text[:safe]), False

    def _emit(self, text: str) -> str:
        delta = text[len(self.emitted):]
        self.emitted = text
        return delta


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper start of `stop`."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
