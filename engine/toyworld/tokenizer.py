"""A CLIPTokenizer with a small vocabulary built in code.

Pitfall (feasibility notes): a vocab of whole words with no merges maps every word to
`<|endoftext|>`, because CLIP's BPE starts from characters and only reaches a word through merges.
So the vocab holds every single character (`c` and word-final `c</w>`), and for each known word a
left-to-right merge chain ('p','i') -> ('pi','c') -> ... -> ('pictur','e</w>') with every
intermediate piece. Unknown words fall back to characters, so rewordings still tokenize.
"""

from __future__ import annotations

import string

from transformers import CLIPTokenizer

from engine.toyworld.render import CONCEPTS

MODEL_MAX_LENGTH = 16
WORDS: tuple[str, ...] = ("a", "picture", "of", "photo", "drawing", "the", "an", "shape", "image", *CONCEPTS)


def _vocab_and_merges(words: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    # bos first so its id is 0 and eos (= pad) is 1, as in the feasibility model.
    tokens: list[str] = ["<|startoftext|>", "<|endoftext|>"]
    for char in string.ascii_lowercase + string.digits + ".,!?'-":
        tokens += [char, char + "</w>"]
    merges: list[tuple[str, str]] = []
    for word in words:
        if len(word) < 2:
            continue
        piece = word[0]
        for index in range(1, len(word)):
            char = word[index] + ("</w>" if index == len(word) - 1 else "")
            merge = (piece, char)
            piece = piece + char
            if merge not in merges:
                merges.append(merge)
            if piece not in tokens:
                tokens.append(piece)
    return {token: index for index, token in enumerate(tokens)}, merges


def build_toy_tokenizer(model_max_length: int = MODEL_MAX_LENGTH) -> CLIPTokenizer:
    vocab, merges = _vocab_and_merges(WORDS)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
