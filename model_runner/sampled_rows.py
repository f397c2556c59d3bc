"""A step's sampled rows while they are still on the device, and their trip to the host.

The sampler returns them without waiting for the device: the tokens feed the next step's
placeholder rows from there (model_runner/placeholders.py). `start_copy` queues their copy
to host memory behind the step's kernels (pinned, non-blocking on CUDA) and `to_host` reads
the copy, once the device has passed it (the runner's collect waits on the step's end event).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from model_runner.step_input import SampledToken
from model_runner.step_upload import to_host


@dataclass(frozen=True, slots=True)
class SampledRows:
    seq_ids: list[str]
    tokens: torch.Tensor  # [R] int64
    want_logprobs: list[int | None] | None = None  # per row: top-n asked for; None: no row asked
    token_logprobs: torch.Tensor | None = None  # [R] float32: each sampled token's logprob
    top_ids: torch.Tensor | None = None  # [R, max n] int64
    top_logprobs: torch.Tensor | None = None  # [R, max n] float32

    def start_copy(self) -> SampledRows:
        """The same rows in host memory. On CUDA the copies are queued, not waited for:
        read them only after the device has run past this point."""
        if self.tokens.device.type == "cpu":
            return self

        def host(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else to_host(t)

        return replace(
            self,
            tokens=host(self.tokens),
            token_logprobs=host(self.token_logprobs),
            top_ids=host(self.top_ids),
            top_logprobs=host(self.top_logprobs),
        )

    def to_host(self) -> list[SampledToken]:
        """One SampledToken per row (a blocking read where the rows are still on the device)."""
        tokens = self.tokens.tolist()
        if self.want_logprobs is None:
            return [SampledToken(s, t) for s, t in zip(self.seq_ids, tokens, strict=True)]
        sampled_lp = self.token_logprobs.tolist()
        top_ids = self.top_ids.tolist() if self.top_ids is not None else None
        top_lps = self.top_logprobs.tolist() if self.top_logprobs is not None else None
        out = []
        for i, (seq_id, n) in enumerate(zip(self.seq_ids, self.want_logprobs, strict=True)):
            if n is None:
                out.append(SampledToken(seq_id, tokens[i]))
                continue
            top = list(zip(top_ids[i][:n], top_lps[i][:n], strict=True)) if n else []
            out.append(SampledToken(seq_id, tokens[i], sampled_lp[i], top))
        return out
