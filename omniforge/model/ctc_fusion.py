"""Joint CTC/attention decoding of transcripts (Watanabe et al., 2017; ESPnet's prefix scorer).

Where the omni model writes down speech (an ASR answer, or what it `heard` of a spoken question
before answering), the LLM may drift from the audio: it copies a colour from earlier in the
sentence, or says what the picture makes likely. The audio tower's own CTC head reads the same
frames with no language prior. While a transcript is being written, each candidate token's
log-probability becomes

    (1 - w) · log p_LLM(token | prefix) + w · (log ψ(prefix + token) - log ψ(prefix))

where ψ is the CTC prefix probability (the mass of all frame alignments whose collapsed labels
start with the prefix) over the frames of the prompt's last audio, and ending the transcript
scores log p_CTC(prefix is the whole utterance) - log ψ(prefix). One decoding step costs
O(frames · vocabulary), all candidates at once.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


class CTCPrefixScorer:
    """Prefix scores of every next token for B transcripts at once, one utterance each.

    log_probs: (B, T, C + 1) per-frame CTC log-probabilities over C tokens, the blank last;
    lengths: (B,) frames of each row that hold its utterance (the rest are ignored).
    """

    def __init__(self, log_probs: torch.Tensor, lengths: torch.Tensor):
        batch, frames, classes = log_probs.shape
        self.blank = classes - 1
        past_end = torch.arange(frames, device=log_probs.device)[None, :] >= lengths[:, None]  # (B, T)
        # past a row's end: blank with certainty, so every prefix keeps its mass and gains none
        self.x = log_probs.float().masked_fill(past_end[..., None], NEG_INF)
        self.x[..., self.blank] = self.x[..., self.blank].masked_fill(past_end, 0.0)
        self.r_nonblank = self.x.new_full((batch, frames), NEG_INF)  # alignments ending in the prefix's last token
        self.r_blank = self.x[..., self.blank].cumsum(-1)  # ... ending in a blank (the empty prefix: all blanks)
        self.log_psi = self.x.new_zeros(batch)  # log ψ(prefix)
        self.last = torch.full((batch,), -1, dtype=torch.long, device=log_probs.device)  # -1: empty prefix
        self._extended: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def reset(self, rows: torch.Tensor) -> None:
        """Start `rows` ((B,) bool) over with the empty prefix."""
        self.r_nonblank[rows] = NEG_INF
        self.r_blank[rows] = self.x[rows, :, self.blank].cumsum(-1)
        self.log_psi[rows] = 0.0
        self.last[rows] = -1

    def scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C) log ψ(prefix + c) - log ψ(prefix) for every token c, and (B,) the same for
        ending the transcript here."""
        x, blank = self.x, self.blank
        tokens = x[..., :blank]  # (B, T, C)
        frames = x.shape[1]
        everything = torch.logaddexp(self.r_nonblank, self.r_blank)  # (B, T)
        # a token repeating the last one must be separated from it by a blank
        repeat = torch.nn.functional.one_hot(self.last.clamp(min=0), blank).bool() & (self.last >= 0)[:, None]
        phi = torch.where(repeat[:, None, :], self.r_blank[..., None], everything[..., None])  # (B, T, C)
        empty = (self.last < 0)[:, None]
        r_nonblank = torch.empty_like(tokens)
        r_blank = torch.empty_like(tokens)
        r_nonblank[:, 0] = torch.where(empty, tokens[:, 0], NEG_INF)
        r_blank[:, 0] = NEG_INF
        for t in range(1, frames):
            r_nonblank[:, t] = torch.logaddexp(r_nonblank[:, t - 1], phi[:, t - 1]) + tokens[:, t]
            r_blank[:, t] = torch.logaddexp(r_nonblank[:, t - 1], r_blank[:, t - 1]) + x[:, t, blank, None]
        starts = torch.cat([r_nonblank[:, :1], phi[:, :-1] + tokens[:, 1:]], dim=1)  # the new token's first frame
        log_psi = starts.logsumexp(1)  # (B, C)
        self._extended = r_nonblank, r_blank, log_psi
        ending = everything[:, -1]
        return log_psi - self.log_psi[:, None], ending - self.log_psi

    def advance(self, tokens: torch.Tensor, rows: torch.Tensor) -> None:
        """Append tokens ((B,) ids < C) to the prefixes of `rows` ((B,) bool), after `scores`."""
        if self._extended is None:
            raise RuntimeError("CTCPrefixScorer.advance: call scores() first")
        r_nonblank, r_blank, log_psi = self._extended
        index = tokens.clamp(0, self.blank - 1)
        picked = index[:, None, None].expand(-1, r_nonblank.shape[1], 1)
        self.r_nonblank[rows] = r_nonblank.gather(2, picked).squeeze(2)[rows]
        self.r_blank[rows] = r_blank.gather(2, picked).squeeze(2)[rows]
        self.log_psi[rows] = log_psi.gather(1, index[:, None]).squeeze(1)[rows]
        self.last[rows] = index[rows]
        self._extended = None


class TranscriptFusion:
    """Which rows are writing a transcript, and their CTC-fused next-token scores.

    A row writes one from an `openings` token (the `heard` token, or for ASR the state token
    that starts an answer) to an `endings` token, scored against its own last audio's frames
    (`lengths` 0: a row without audio never writes one).
    """

    def __init__(self, log_probs: torch.Tensor, lengths: torch.Tensor, weight: float, openings: list[int],
                 endings: list[int]):
        self.scorer = CTCPrefixScorer(log_probs, lengths)
        self.weight = weight
        device = log_probs.device
        self.openings = torch.tensor(openings, dtype=torch.long, device=device)
        self.endings = torch.tensor(endings, dtype=torch.long, device=device)
        self.has_audio = lengths > 0
        self.active = torch.zeros_like(self.has_audio)

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) next-token logits -> the scores to pick from: active rows fused, the rest as given."""
        if not self.active.any():
            return logits
        token_scores, ending_score = self.scorer.scores()
        ctc = logits.new_full(logits.shape, NEG_INF, dtype=torch.float32)
        covered = min(token_scores.shape[1], logits.shape[1])  # tokens past the CTC head's vocabulary: never heard
        ctc[:, :covered] = token_scores[:, :covered]
        ctc[:, self.endings] = ending_score[:, None]
        fused = (1 - self.weight) * logits.float().log_softmax(-1) + self.weight * ctc.nan_to_num(nan=NEG_INF, neginf=NEG_INF)
        # a prefix the frames cannot hold (longer than them) leaves every candidate at -inf: the LLM decides
        fused_rows = self.active & torch.isfinite(fused).any(-1)
        return torch.where(fused_rows[:, None], fused, logits.float())

    def update(self, tokens: torch.Tensor, finished: torch.Tensor) -> None:
        """Record the tokens just picked ((B,) ids; `finished`: rows that have stopped): advance
        the prefixes being written, close and open transcripts."""
        writing = self.active & ~torch.isin(tokens, self.endings) & ~finished
        if writing.any():
            self.scorer.advance(tokens, writing)
        opened = torch.isin(tokens, self.openings) & self.has_audio & ~finished & ~self.active
        if opened.any():
            self.scorer.reset(opened)
        self.active = writing | opened
