"""Names the mistake behind a failing submission: the grader's diagnosis, never shown to the model.

A known wrong conversion (conversions.py) is in play on an instance when it can run there and
gives tensors that differ from the reference conversion's and from every wrong conversion
before it; a failing file gets its label only when that conversion gives exactly the tensors
where the file differs from the reference.
"""
from collections.abc import Iterator

import numpy as np

from conversions import MISTAKES, READING_MISTAKES, Files, convert_values, read_values


def same(a: np.ndarray, b: np.ndarray | None) -> bool:  # None: a conversion that does not write that tensor
    return b is not None and a.shape == b.shape and (np.array_equal(a, b) or np.allclose(a, b, rtol=1e-3, atol=1e-6))


def mistakes_in_play(files: Files, args: dict, config: dict, optimizer: Files | None, level: int,
                     reference: dict[str, np.ndarray]) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """(mistake, its wrong conversion) for each mistake of `level` or below that is in play here, lazily."""
    values, seen = read_values(files, args, optimizer), [reference]  # values: shared by mistakes not made in reading
    for mistake in (m for m, first in MISTAKES.items() if first <= level):
        read = read_values(files, args, optimizer, mistake) if mistake in READING_MISTAKES else values
        try:
            wrong = convert_values(read, args, config, mistake)
        except KeyError:  # it reads a tensor this instance does not have: the convention is not in play
            continue
        if not any(wrong.keys() == earlier.keys() and all(same(wrong[k], earlier[k]) for k in wrong) for earlier in seen):
            seen.append(wrong)
            yield mistake, wrong


def explain_failure(weights: dict[str, np.ndarray], reference: dict[str, np.ndarray], files: Files, args: dict,
                    config: dict, optimizer: Files | None, level: int) -> tuple[str, str]:
    """(label, detail) for a failing submission: the mistake in play whose wrong conversion gives every
    tensor where `weights` differ from `reference` and changes no other; "other" if none does, so that a
    label always says what happened."""
    differing = [k for k in reference if not same(weights[k], reference[k])]
    if not differing:
        return "other", "every tensor is within rtol 1e-3 of the reference conversion, yet the logits miss"
    for mistake, wrong in mistakes_in_play(files, args, config, optimizer, level, reference):
        if all(same(weights[k], wrong.get(k)) for k in differing) and \
                all(same(reference[k], wrong.get(k)) for k in reference if k not in differing):
            n = len(differing)
            return mistake, f"the {n} tensor{'s' * (n != 1)} that differ are those of a conversion that gets {mistake} wrong"
    return "other", (f"{len(differing)} tensors differ (first: {differing[0]}); no single known mistake gives them "
                     "all and only them")
