"""Synthetic prompts of a chosen length in tokens, shared by the benchmark scripts.

Every word below is one token (with its leading space) for GPT-2-style BPE vocabularies such
as SmolLM2's, so a prompt of N words is about N tokens. Each prompt starts with its own
number, so distinct requests share no KV blocks unless a shared prefix is asked for.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = """
time year people way day man thing woman life child world school state family student group
country problem hand part place case week company system program question work government
number night point home water room mother area money story fact month lot right study book eye
job word business issue side kind head house service friend father power hour game line end
member law car city community name president team minute idea kid body information back parent
face others level office door health person art war history party result change morning reason
research girl guy moment air teacher force education foot boy age policy music market sense
nation plan college interest death experience effect class control care field development role
effort rate heart drug show leader light voice wife police mind price report decision son view
relationship town road arm difference value building action model season society tax director
position player record paper space ground form event official matter center couple site project
activity star table need court oil situation cost industry figure street image phone data
picture practice piece land product doctor wall patient worker news test movie north love
support technology step baby computer type attention film tree source organization hair window
evidence population truth song science bed stage church range account goal garden river ocean
mountain forest bird horse dog cat fish apple bread milk coffee tea sugar salt stone glass metal
wood fire wind rain snow sun moon cloud sky island bridge train ship plane
""".split()


def word_text(num_tokens: int, rng: random.Random) -> str:
    """About `num_tokens` tokens of random words (no leading space)."""
    return " ".join(rng.choice(WORDS) for _ in range(max(num_tokens, 1)))


def make_prompts(num: int, input_len: int, seed: int = 0) -> list[str]:
    """`num` distinct prompts of about `input_len` tokens each."""
    rng = random.Random(seed)
    head = "Continue the story:"  # NOTE: counted as ~4 tokens of the budget, with the number
    return [f"{i} {head} {word_text(input_len - 5, rng)}" for i in range(num)]


def shared_prefix(prefix_len: int, seed: int = 0) -> str:
    """A system prompt of about `prefix_len` tokens, identical for every request."""
    rng = random.Random(seed + 1_000_003)
    return "You are a helpful assistant. Background notes: " + word_text(prefix_len - 9, rng)


def make_questions(num: int, question_len: int, seed: int = 0) -> list[str]:
    """`num` distinct questions of about `question_len` tokens each."""
    rng = random.Random(seed + 2)
    return [f"Question {i}: {word_text(question_len - 6, rng)}?" for i in range(num)]


def prompts_from_file(path: str | Path, num: int) -> list[str]:
    """Prompts from a text file, cycled to `num`: one per non-empty line, or in a `.jsonl`
    file one JSON string per line (prompts that span lines, such as code blocks)."""
    path = Path(path)
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if path.suffix == ".jsonl":
        lines = [json.loads(ln) for ln in lines]
    if not lines:
        raise ValueError(f"{path} holds no prompts")
    return [lines[i % len(lines)] for i in range(num)]
