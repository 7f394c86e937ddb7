"""Whisper's decoding rules for long-form transcription, as openai-whisper's ``decoding.py`` applies them: a blank
(or end-of-text) is not the first token, suppressed tokens, and the timestamp rules.

Each rule is a score processor, ``processor(scores (N, V), tokens (N, L), step) -> scores``: ``tokens`` is the whole
decoder sequence so far (the prompt included, left-padded to one width), ``step`` the tokens generated so far, so the
sampled part of every row is ``tokens[:, L - step:]``. Scores are changed in place and returned.

Shape legend: N decoded rows, L tokens so far, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmformer.convert.whisper_vocab import WhisperTokens


# ---------------------------------------------------------------------- score processors
class TimestampRules:
    """openai-whisper's ``ApplyTimestampRules``: no ``<|notimestamps|>``; timestamps come in pairs (except right
    before end-of-text) and never decrease, and a segment has a nonzero length; the first token is a timestamp of at
    most ``max_initial_timestamp_index`` quanta; a timestamp is forced when the timestamps' total probability beats
    every text token's."""

    def __init__(self, whisper: WhisperTokens, max_initial_timestamp_index: int | None):
        self.w, self.max_initial = whisper, max_initial_timestamp_index

    def __call__(self, scores: torch.Tensor, tokens: torch.Tensor, step: int) -> torch.Tensor:
        ts, eot, inf = self.w.timestamp_begin, self.w.eot, float("-inf")
        scores[:, self.w.no_timestamps] = inf
        sampled = tokens[:, tokens.shape[1] - step :]  # (N, step)
        for k, row in enumerate(sampled.tolist()):
            last_was_timestamp = len(row) >= 1 and row[-1] >= ts
            penultimate_was_timestamp = len(row) < 2 or row[-2] >= ts
            if last_was_timestamp:
                if penultimate_was_timestamp:  # a pair just closed: text (or end-of-text) next
                    scores[k, ts:] = inf
                else:  # an open timestamp: another one or end-of-text, no text
                    scores[k, :eot] = inf
            stamps = [t for t in row if t >= ts]
            if stamps:  # non-decreasing, and a segment of nonzero length
                last = stamps[-1] if last_was_timestamp and not penultimate_was_timestamp else stamps[-1] + 1
                scores[k, ts:last] = inf
        if step == 0:
            scores[:, :ts] = inf  # the first token is a timestamp
            if self.max_initial is not None:
                scores[:, ts + self.max_initial + 1 :] = inf
        logprobs = F.log_softmax(scores.float(), dim=-1)
        timestamp_logprob = logprobs[:, ts:].logsumexp(dim=-1)  # (N,)
        max_text_logprob = logprobs[:, :ts].max(dim=-1).values  # (N,)
        forced = timestamp_logprob > max_text_logprob
        if bool(forced.any()):
            scores[forced, :ts] = inf
        return scores
