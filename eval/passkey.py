"""Pass-key retrieval: a random number hidden at a chosen depth in long filler.

The prompt is: an instruction, neutral filler sentences with the needle
"The pass key is NNNNN. Remember it. NNNNN is the pass key." inserted at a
relative depth, then the question "What is the pass key?" (Mohtashami and
Jaggi, 2023). A model passes if the first number of the key's length in its
answer is the key.
"""

from __future__ import annotations

import dataclasses
import re

INSTRUCTION = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it."
)
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
QUESTION = "What is the pass key?"
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."


@dataclasses.dataclass(frozen=True)
class PasskeyPrompt:
    """A pass-key prompt and where its key sits (characters and tokens)."""
    text: str  # the whole prompt
    key: str  # the key, key_digits decimal digits
    char_offset: int  # index in text of the key's first digit (first occurrence)
    token_offset: int  # index of the token holding that digit (words when no tokenizer)
    filler_sentences: int  # number of filler sentences in the prompt


def _encode(tokenizer, text: str) -> list[int]:
    if hasattr(tokenizer, "encode"):
        try:
            return list(tokenizer.encode(text, add_special_tokens=False))
        except TypeError:
            return list(tokenizer.encode(text))
    return list(tokenizer(text)["input_ids"])


def _count(tokenizer, text: str) -> int:
    return len(text.split()) if tokenizer is None else len(_encode(tokenizer, text))


def _token_index(tokenizer, text: str, char_offset: int) -> int:
    """Index of the token covering text[char_offset] (no special tokens)."""
    if tokenizer is None:
        return len(text[:char_offset].split())
    try:
        spans = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
        return next(i for i, (_, end) in enumerate(spans) if end > char_offset)
    except (TypeError, KeyError, NotImplementedError, StopIteration):
        return len(_encode(tokenizer, text[:char_offset].rstrip()))


def _random_key(rng, digits: int) -> str:
    lo, hi = 10 ** (digits - 1), 10**digits
    value = rng.integers(lo, hi) if hasattr(rng, "integers") else rng.randint(lo, hi - 1)
    return str(int(value))


def make_passkey_prompt(rng, filler_tokens: int, depth: float, key_digits: int = 5, tokenizer=None) -> PasskeyPrompt:
    """Build one pass-key prompt.

    rng: numpy Generator or random.Random (draws the key). filler_tokens: at
    least this many filler tokens (counted with tokenizer, or in words when it
    is None). depth in [0, 1]: fraction of the filler sentences placed before
    the needle. Deterministic for a given rng state.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError("depth must be in [0, 1]")
    if key_digits < 1:
        raise ValueError("key_digits must be positive")
    key = _random_key(rng, key_digits)
    sentences, n_tokens = [], 0
    while n_tokens < filler_tokens:
        sentence = FILLER[len(sentences) % len(FILLER)]
        sentences.append(sentence)
        n_tokens += _count(tokenizer, " " + sentence)
    cut = round(depth * len(sentences))
    needle = NEEDLE.format(key=key)
    body = " ".join(sentences[:cut] + [needle] + sentences[cut:])
    text = f"{INSTRUCTION} {body} {QUESTION}"
    char_offset = text.index(needle) + needle.index(key)
    return PasskeyPrompt(text, key, char_offset, _token_index(tokenizer, text, char_offset), len(sentences))


def score_passkey(output_text: str, key: str) -> bool:
    """True when the first number with exactly len(key) digits in output_text is key."""
    for number in re.findall(r"\d+", output_text):
        if len(number) == len(key):
            return number == key
    return False
