"""A contiguous copy of the running batch's K/V, so CPU decode steps skip the block gather.

On the CPU, gathering each sequence's blocks out of the paged cache costs a decode step
about as much as the attention itself (every layer copies every context block). In steady
decoding the batch is the same from one step to the next and each context grows by one
token, so `DecodeContext` keeps per layer K and V of shape [rows, capacity, kv_heads, dim],
row i holding the context of the step's i-th sequence:

- a decode step that continues the last committed step (the same rows in the same order,
  each starting its new tokens at or before the length the buffers hold) appends its new
  tokens per row: the *append* mode;
- any other decode step gathers every row once from the paged cache: the *gather* mode;
- prefill or mixed steps, steps with block copies, and batches over the memory budget
  skip it (and the next decode step gathers).

A row usually gets one new token. A sequence verifying K speculative tokens gets K + 1, at
consecutive positions (the fused C++ layer only: `multi_token` steps); once the step is
collected, only its accepted prefix is the sequence's, and the next step starts right after
it, at or before the held length: positions before its start hold the accepted tokens' K/V,
positions from it on are overwritten.

A row is a key the caller picks for what the row holds: the runner passes its sequence
state objects, so a sequence re-sent after preemption, or a new one that took a finished
one's id, is a new row even at the right length. Overlap (model_runner/placeholders.py) may
drop rows from a step after the scheduler planned it: the caller plans with the rows that
execute, never the planned ones, and commits the step it ran.

The paged cache stays the source of truth (prefix caching, forks, preemption): every step
writes it first. Positions past a row's length hold zeros or stale (finite) values that
the mask hides.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from kernels.paged_attention import decode_attention, decode_visible_mask

# Columns are reserved in steps of this many tokens, so a growing batch reallocates rarely.
CAPACITY_STEP = 128


class DecodeContextStep:
    """One decode step's use of the context: its mode and per-step index tensors."""

    __slots__ = (
        "_mask", "append", "buffers", "ctx_len", "gather_index", "held", "max_len", "multi_token",
        "new_slots", "num_rows", "seq_lens", "sliding_window", "token_lens", "token_rows",
    )  # fmt: skip

    def __init__(
        self,
        buffers: list[tuple[torch.Tensor, torch.Tensor]],
        append: bool,
        seq_lens: torch.Tensor,
        max_len: int,
        ctx_len: int,
        new_slots: torch.Tensor,
        gather_index: torch.Tensor | None,
        sliding_window: int | None = None,
        held: tuple[tuple, list[int]] | None = None,
        token_rows: torch.Tensor | None = None,
        token_lens: torch.Tensor | None = None,
    ):
        self.buffers = buffers
        self.append = append
        self.seq_lens = seq_lens  # [seqs] int32, this step's token included
        self.max_len = max_len
        self.ctx_len = ctx_len
        self.sliding_window = sliding_window
        self._mask: torch.Tensor | None = None  # built by the first `attend`, shared by layers
        self.new_slots = new_slots  # [tokens] row * capacity + position of each new token
        self.gather_index = gather_index  # [seqs * blocks] block ids, gather mode only
        self.held = held  # (rows, lengths) the buffers hold once this step has run
        self.num_rows = seq_lens.shape[0]
        # Per new token: its buffer row and its row's length up to and including it.
        self.token_rows = torch.arange(self.num_rows) if token_rows is None else token_rows
        self.token_lens = seq_lens.long() if token_lens is None else token_lens
        self.multi_token = self.token_rows.shape[0] > self.num_rows

    def mask_before_new(self, length: int) -> torch.Tensor:
        """[S, 1, 1, length + 1] bool: the first `length` context columns, then the new token.

        For attention over the context *before* this step's token with the token appended.
        """
        visible = decode_visible_mask(self.seq_lens, length, self.sliding_window, before_new=True)
        return torch.cat([visible, torch.ones_like(visible[..., :1])], dim=-1)

    def append_rows(
        self, buffers: tuple[torch.Tensor, torch.Tensor], key: torch.Tensor, value: torch.Tensor
    ) -> None:
        """Write this step's K/V [S, KVH, D] into one layer's buffers (append mode)."""
        for buf, new in zip(buffers, (key, value), strict=True):
            buf.view(-1, *buf.shape[2:]).index_copy_(0, self.new_slots, new.to(buf.dtype))

    def gather(
        self,
        buffers: tuple[torch.Tensor, torch.Tensor],
        paged: tuple[torch.Tensor, torch.Tensor],
        num_seqs: int,
    ) -> None:
        """Copy every row's blocks of one layer from the paged cache (gather mode)."""
        for buf, cache in zip(buffers, paged, strict=True):
            gathered = cache.index_select(0, self.gather_index)
            gathered = gathered.view(num_seqs, -1, *cache.shape[2:])  # whole blocks per row
            buf[:num_seqs, : gathered.shape[1]] = gathered

    def attend(
        self,
        buffers: tuple[torch.Tensor, torch.Tensor],
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        paged: tuple[torch.Tensor, torch.Tensor],
        scale: float,
    ) -> torch.Tensor:
        """Bring one layer's context `buffers` up to date (append or gather), then attend."""
        if self.multi_token:
            raise ValueError("a multi-token decode context step runs in the fused layer only")
        k_buf, v_buf = buffers
        num_seqs = query.shape[0]
        if self.append:
            self.append_rows(buffers, key, value)
        else:
            self.gather(buffers, paged, num_seqs)
        keys, values = k_buf[:num_seqs, : self.ctx_len], v_buf[:num_seqs, : self.ctx_len]
        if self._mask is None:
            self._mask = decode_visible_mask(self.seq_lens, self.ctx_len, self.sliding_window)
        return decode_attention(query, keys, values, self._mask, scale)


class DecodeContext:
    """The per-layer buffers and what the last decode step left in them (see the module)."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        max_bytes: int,
        sliding_window: int | None = None,
    ):
        self.num_layers = num_layers
        self.sliding_window = sliding_window
        self.row_shape = (num_kv_heads, head_dim)
        self.dtype = dtype
        self.max_bytes = max_bytes
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.rows = self.capacity = 0
        # What the buffers hold after the last committed step: its rows and their lengths.
        self._held: tuple[tuple, list[int]] | None = None
        self._planned: DecodeContextStep | None = None  # the last step planned, until run

    def bytes_for(self, rows: int, capacity: int) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * rows * capacity * self.row_shape[0] * self.row_shape[1] * elem

    def plan(
        self,
        rows: Sequence[Hashable],
        seq_lens_t: torch.Tensor,
        block_tables: torch.Tensor,
        block_size: int,
        new_tokens: Sequence[int] | None = None,
    ) -> DecodeContextStep | None:
        """The step's use of the context for a decode-only batch, or None to gather as usual.

        `rows`: one key per row of the step that executes, in its order; `new_tokens`: how
        many new tokens each has (default one; see the module). Call `commit` with the
        returned step once its forward has succeeded; until then nothing is held.
        """
        held, self._held, self._planned = self._held, None, None
        if not len(rows) == seq_lens_t.shape[0] == block_tables.shape[0]:
            raise ValueError(
                f"{len(rows)} rows, {seq_lens_t.shape[0]} lengths, {block_tables.shape[0]} "
                "block tables: a decode context step has one of each per row"
            )
        seq_lens = seq_lens_t.tolist()
        new_tokens = [1] * len(seq_lens) if new_tokens is None else list(new_tokens)
        max_len = max(seq_lens)
        fits, kept = self._ensure_capacity(len(rows), max_len, block_size)
        if not fits:
            return None
        keys = tuple(rows)
        append = (
            kept
            and held is not None
            and held[0] == keys  # NOTE: keys without __eq__ (sequence states) by identity
            and all(0 <= n - q <= h for n, q, h in zip(seq_lens, new_tokens, held[1], strict=True))
        )
        token_rows, token_lens = _token_rows(seq_lens, new_tokens)
        new_slots = token_rows * self.capacity + (token_lens - 1)
        num_blocks = -(-max_len // block_size)
        gather_index = None
        if not append:
            gather_index = block_tables[:, :num_blocks].reshape(-1).long()
        # NOTE: attend over whole blocks (masked past each length), as the paged path does: a
        # row's result then depends on its own length only, not on the longest in the batch
        # (a bare max length moved the attention kernel's vector tails: not batch-invariant).
        ctx_len = num_blocks * block_size
        step = DecodeContextStep(
            self.buffers, append, seq_lens_t, max_len, ctx_len, new_slots, gather_index,
            self.sliding_window, held=(keys, seq_lens), token_rows=token_rows,
            token_lens=token_lens,
        )  # fmt: skip
        self._planned = step
        return step

    def commit(self, step: DecodeContextStep) -> None:
        """`step` ran: the buffers now hold its rows at their new lengths. Only the step
        planned last may commit (an older one's rows are no longer what the buffers hold)."""
        if step is not self._planned:
            raise ValueError("commit(): not the decode context step planned last")
        self._held, self._planned = step.held, None

    def reset(self) -> None:
        """A step that bypassed the context ran: what the buffers hold is stale."""
        self._held, self._planned = None, None

    def _ensure_capacity(self, rows: int, max_len: int, block_size: int) -> tuple[bool, bool]:
        """(fits the budget, buffers kept): grows them when the batch outgrows them."""
        # NOTE: whole blocks are gathered, so the capacity is a multiple of the block size.
        if rows <= self.rows and -(-max_len // block_size) * block_size <= self.capacity:
            return True, True
        new_rows = max(rows, self.rows)
        step = -(-CAPACITY_STEP // block_size) * block_size
        capacity = max(self.capacity, -(-(max_len + 1) // step) * step)
        if self.bytes_for(new_rows, capacity) > self.max_bytes:
            return False, False
        shape = (new_rows, capacity, *self.row_shape)
        # NOTE: zeros, not empty: masked positions still meet V in SDPA, and 0 * NaN is NaN.
        self.buffers = [
            (torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype))
            for _ in range(self.num_layers)
        ]
        self.rows, self.capacity = new_rows, capacity
        return True, False


def _token_rows(seq_lens: list[int], new_tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per new token: its row, and its row's length up to and including it."""
    rows = [i for i, q in enumerate(new_tokens) for _ in range(q)]
    lens = [n - q + j + 1 for n, q in zip(seq_lens, new_tokens, strict=True) for j in range(q)]
    return torch.tensor(rows, dtype=torch.long), torch.tensor(lens, dtype=torch.long)
