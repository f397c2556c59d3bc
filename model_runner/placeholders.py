"""Overlap: the previous step's sampled tokens, kept on the device for the placeholder rows
of the next step (`ScheduledChunk.num_placeholders`), which the scheduler planned before it
knew them.

NOTE: a step's record lives until the next step starts, and only that step may use it: a
failed step leaves none, so the rows that wait on its tokens are dropped from the next one
(the scheduler finishes those sequences "error" and discards what the next step returns).
"""

from __future__ import annotations

import msgspec
import torch

from model_runner.step_input import StepInput
from model_runner.step_upload import to_device


class LastSampled:
    def __init__(self) -> None:
        self._step_id = -1
        self._rows: dict[str, int] = {}
        self._tokens: torch.Tensor | None = None

    def record(self, step_id: int, seq_ids: list[str | None], tokens: torch.Tensor) -> None:
        """Step `step_id` sampled tokens[i] (on the device) for seq_ids[i]; None: a row no
        placeholder may take (a speculating sequence's positions)."""
        self._step_id, self._rows, self._tokens = (
            step_id,
            {seq_id: i for i, seq_id in enumerate(seq_ids) if seq_id is not None},
            tokens,
        )

    def take(self, step: StepInput) -> tuple[StepInput, dict[str, int], torch.Tensor | None]:
        """Start `step`: (the step without its unresolvable rows, row of each sequence in the
        previous step's samples, those samples). Clears the record."""
        rows = self._rows if self._step_id == step.step_id - 1 else {}
        tokens = self._tokens
        self._step_id, self._rows, self._tokens = -1, {}, None
        kept = [c for c in step.chunks if not c.num_placeholders or c.seq_id in rows]
        if len(kept) != len(step.chunks):
            step = msgspec.structs.replace(step, chunks=kept)
        return step, rows, tokens


def fill_placeholders(
    input_ids: torch.Tensor, step: StepInput, rows: dict[str, int], tokens: torch.Tensor | None
) -> None:
    """Write each placeholder row's input (the chunk's last token) from `tokens`, on the
    device: no host round trip for the token."""
    dst, src, end = [], [], 0
    for chunk in step.chunks:
        end += chunk.num_tokens + len(chunk.draft_token_ids)  # NOTE: the rows it computes
        if chunk.num_placeholders:
            dst.append(end - 1)
            src.append(rows[chunk.seq_id])
    if not dst:
        return
    device = input_ids.device
    index = to_device(src, torch.long, device)
    input_ids[to_device(dst, torch.long, device)] = tokens[index]
