"""Cost attribution: each step's device time split among its requests by their share of
the step's tokens.

A request is charged for every token it had computed, recomputes after a preemption and the
work of a step it was aborted during included, so the per-feature totals are what the
requests caused. `Request.gpu_seconds` is what its responses report.
"""

from __future__ import annotations

from actors.scheduler.sequence import Sequence


class CostLedger:
    """Device seconds per feature label (bounded by the API) and per-step token counts."""

    def __init__(self) -> None:
        self.gpu_seconds_by_feature: dict[str, float] = {}
        self.prompt_tokens_computed = 0
        self.generation_tokens = 0
        self._iteration_tokens: list[int] = []

    def charge(self, scheduled: list[tuple[Sequence, int]], device_seconds: float) -> None:
        """One finished step: `scheduled` is (sequence, tokens computed) for each sequence,
        speculative proposals included."""
        total = sum(num_tokens for _, num_tokens in scheduled)
        if total == 0:
            return
        self._iteration_tokens.append(total)
        per_token = device_seconds / total
        by_feature = self.gpu_seconds_by_feature
        for seq, num_tokens in scheduled:
            share = per_token * num_tokens
            request = seq.request
            request.gpu_seconds += share
            by_feature[request.feature] = by_feature.get(request.feature, 0.0) + share
            # NOTE: a chunk reaching past the prompt (prefill's last token or a decode)
            # computes one sampled token's K/V; the rest of the chunk is prompt.
            prompt_part = max(0, min(num_tokens, seq.prompt_len - seq.num_computed))
            self.prompt_tokens_computed += prompt_part

    def count_generated(self, num_tokens: int) -> None:
        """Tokens a step added to outputs (not those discarded after a stop)."""
        self.generation_tokens += num_tokens

    def take_iteration_tokens(self) -> list[int]:
        """Tokens of each step charged since the last call."""
        done, self._iteration_tokens = self._iteration_tokens, []
        return done
