"""The caption vocabulary of `shapes` and the word-level tokenizer of prompts (no torch).

A prompt such as "red triangle" becomes a fixed-length list of token indices into `VOCABULARY`,
right-padded with index 0 (`<pad>`). The all-padding sequence [0, …, 0] is the null condition ∅
that classifier-free guidance (Ho & Salimans 2022) mixes with the conditional prediction:

    ε̃ = ε(x_t, ∅) + w · (ε(x_t, c) − ε(x_t, ∅)).

This module must stay importable without torch: the gateway validates prompts with it.
"""

from __future__ import annotations

import re

PAD = "<pad>"

# The attribute names of `shapes` live here (not in models/data/shapes.py) so that the gateway can
# read them without importing torch.
SHAPES: list[str] = ["circle", "square", "triangle", "cross"]
COLOURS: list[str] = ["red", "green", "blue", "yellow", "magenta", "cyan"]

VOCABULARY: list[str] = [PAD, *COLOURS, *SHAPES]
CONTEXT_LEN = 4  # longest caption "red triangle" has 2 words; 4 leaves room for short variants

_WORD = re.compile(r"[a-z<>]+")


def caption(colour: str, shape: str) -> str:
    """The caption of one `shapes` image, colour first: caption("red", "triangle") = "red triangle"."""
    return f"{colour} {shape}"


def tokenize(prompt: str) -> list[str]:
    """Lower-cased words of `prompt`; punctuation and repeated spaces are ignored."""
    return _WORD.findall(prompt.lower())


def encode_prompt(prompt: str, vocabulary: list[str], context_len: int) -> list[int]:
    """`prompt` → `context_len` token indices into `vocabulary`, right-padded with 0 (`<pad>`).

    Raises ValueError, with a message fit for a 4xx answer, when the prompt is empty, uses a word
    outside the vocabulary (the message names them and lists the vocabulary) or is too long.
    """
    if not vocabulary or vocabulary[0] != PAD:
        raise ValueError(f"a vocabulary must start with {PAD!r} (index 0 is the null condition)")
    words = tokenize(prompt)
    allowed = vocabulary[1:]
    if not words:
        raise ValueError(
            "the prompt has no words; send a prompt such as 'red triangle', or null for an "
            f"unconditional sample. Vocabulary: {', '.join(allowed)}"
        )
    index = {word: i for i, word in enumerate(vocabulary) if i > 0}
    unknown = [word for word in words if word not in index]
    if unknown:
        listed = ", ".join(repr(w) for w in dict.fromkeys(unknown))
        raise ValueError(
            f"unknown word(s) in the prompt: {listed}. Vocabulary: {', '.join(allowed)}"
        )
    if len(words) > context_len:
        raise ValueError(
            f"the prompt has {len(words)} words; this model reads at most {context_len}"
        )
    tokens = [index[word] for word in words]
    return tokens + [0] * (context_len - len(tokens))


def null_tokens(context_len: int) -> list[int]:
    """The null condition ∅: a sequence of `context_len` padding tokens."""
    return [0] * context_len
