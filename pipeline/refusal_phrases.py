"""The phrase-matching refusal test: does a completion refuse, by a `prefix` or `substring` scorer's phrases.

Shared by the score stage (its phrase scorers) and the length stage (refusal by generation length);
the judge scorer is `judge.py`, the logit refusal score `refusal.py`.
"""

from __future__ import annotations

from .specs import ScorerSpec

# A scorer with fold_quotes matches typographic quotes as straight ones, in completions and phrases alike.
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})


def is_refusal(completion: str, scorer: ScorerSpec) -> bool:
    """The base-models post's test on the stripped completion (prefix) or the direction paper's (substring),
    case-sensitive or (both sides lower-cased) not."""
    text, phrases = completion.strip(), list(scorer.phrases)
    if scorer.fold_quotes:
        text, phrases = text.translate(_QUOTES), [p.translate(_QUOTES) for p in phrases]
    if not scorer.case_sensitive:
        text, phrases = text.lower(), [p.lower() for p in phrases]
    if scorer.kind == "prefix":
        return any(text.startswith(p) for p in phrases)
    return any(p in text for p in phrases)
