"""Teacher forcing through the model runner's forward: log-probabilities at every position.

The prompt is prefilled in one chunk; every later token is fed as a one-token decode step
(`batch` sequences per step), so the projections run at the row counts of real decode
steps: the 4-bit GEMM at a few rows, its dense copy at many.
"""

from __future__ import annotations

import torch

from model_runner.attention import AttentionMetadata
from model_runner.runner import ModelRunner


def _step(runner, chunks: list[tuple[list[int], int, list[int]]]) -> torch.Tensor:
    """One forward of (tokens, first position, block table) chunks; last-row log-probs."""
    bs = runner.block_size
    tokens, positions, slots, starts = [], [], [], [0]
    for ids, first, table in chunks:
        for p, tok in enumerate(ids, start=first):
            tokens.append(tok)
            positions.append(p)
            slots.append(table[p // bs] * bs + p % bs)
        starts.append(starts[-1] + len(ids))
    tables = [table for _, _, table in chunks]
    seq_lens = [first + len(ids) for ids, first, _ in chunks]
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        max_query_len=max(len(ids) for ids, _, _ in chunks),
        max_seq_len=max(seq_lens),
        all_slots_valid=True,
    )
    with torch.inference_mode():
        logits = runner.model(
            torch.tensor(tokens),
            torch.tensor(positions),
            runner.kv_cache.layers,
            meta,
            torch.tensor(starts[1:]) - 1,
        )
    return torch.log_softmax(logits.float(), dim=-1)


def teacher_forced_logprobs(
    runner: ModelRunner, sequences: list[list[int]], prompt_lens: list[int], batch: int = 1
) -> list[torch.Tensor]:
    """For each sequence, [len - prompt_len, vocab] log-probs predicting tokens after the prompt."""
    out: list[torch.Tensor] = []
    for first in range(0, len(sequences), batch):
        group = sequences[first : first + batch]
        plens = prompt_lens[first : first + batch]
        out.extend(_forced_group(runner, group, plens))
    return out


def _forced_group(runner, seqs, prompt_lens) -> list[torch.Tensor]:
    bs = runner.block_size
    per_seq = -(-max(len(s) for s in seqs) // bs)
    assert per_seq * len(seqs) <= runner.num_blocks, "KV cache too small for the test"
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(seqs))]
    rows: list[list[torch.Tensor]] = [[] for _ in seqs]
    for i, (seq, n) in enumerate(zip(seqs, prompt_lens, strict=True)):
        rows[i].append(_step(runner, [(seq[:n], 0, tables[i])])[0])
    for j in range(max(len(s) - n for s, n in zip(seqs, prompt_lens, strict=True)) - 1):
        live = [
            i for i, (s, n) in enumerate(zip(seqs, prompt_lens, strict=True)) if n + j < len(s) - 1
        ]
        lp = _step(
            runner, [([seqs[i][prompt_lens[i] + j]], prompt_lens[i] + j, tables[i]) for i in live]
        )
        for row, i in enumerate(live):
            rows[i].append(lp[row])
    return [torch.stack(r) for r in rows]
