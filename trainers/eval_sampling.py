"""Seeded draws for evaluation that depend only on the user (and case), never on the batch, rank or
world size a user lands in: the eval.max_users sample and the sampled protocol's negatives."""

from __future__ import annotations

import numpy as np

from core.interactions import key_membership

NEGATIVE_ROUNDS = 32


def mix64(values: np.ndarray) -> np.ndarray:
    """A stateless 64-bit hash (the splitmix64 finaliser), vectorised: seeded draws that depend on
    the user alone, whatever batch or rank the user lands in."""
    x = np.asarray(values).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


def unit_hash(seed: int, values: np.ndarray) -> np.ndarray:
    """Uniform floats in [0, 1) from (seed, value)."""
    return (mix64(mix64(np.uint64(seed & 0xFFFFFFFF)) ^ np.asarray(values).astype(np.uint64)) >> np.uint64(11)) / float(1 << 53)


def repeated_in_row(draws: np.ndarray) -> np.ndarray:
    """Bool [N, C]: True where the value already appeared earlier (in sorted order) in its row."""
    order = np.argsort(draws, axis=1, kind="stable")
    ordered = np.take_along_axis(draws, order, axis=1)
    repeated = np.zeros(draws.shape, dtype=bool)
    repeated[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    out = np.zeros(draws.shape, dtype=bool)
    np.put_along_axis(out, order, repeated, axis=1)
    return out


def unseen_negatives(users: np.ndarray, targets: np.ndarray, seen_keys: np.ndarray, seen_counts: np.ndarray,
                     num_items: int, count: int, seed: int) -> np.ndarray:
    """[N, count] distinct items that user[n] never interacted with, for the case (user, target):
    a function of (seed, user, target) only. seen_keys: sorted user * num_items + item of every
    interaction of these users; seen_counts: interactions per case's user. Clashes are redrawn;
    the rare row still short after NEGATIVE_ROUNDS rounds is drawn exactly."""
    short = num_items - seen_counts < count
    if short.any():
        raise ValueError(f"only {int(num_items - seen_counts[short].max())} unseen items for user "
                         f"{int(users[short][0])}, cannot sample {count} negatives")
    base = mix64(mix64(mix64(np.uint64(seed)) ^ users.astype(np.uint64)) ^ targets.astype(np.uint64))[:, None]
    counters = np.broadcast_to(np.arange(count, dtype=np.uint64), (len(users), count)).copy()
    draws = (mix64(base ^ mix64(counters)) % np.uint64(num_items)).astype(np.int64)
    keys_of = users.astype(np.int64)[:, None] * num_items
    is_seen = key_membership(seen_keys)  # built once for the rounds
    for _ in range(NEGATIVE_ROUNDS):
        bad = repeated_in_row(draws) | is_seen(keys_of + draws)
        if not bad.any():
            return draws
        counters[bad] += np.uint64(count)
        draws[bad] = (mix64(np.broadcast_to(base, draws.shape)[bad] ^ mix64(counters[bad])) % np.uint64(num_items)).astype(np.int64)
    for row in np.flatnonzero(bad.any(1)):  # tiny catalogues only: finish these rows exactly
        seen = seen_keys[(seen_keys >= keys_of[row, 0]) & (seen_keys < keys_of[row, 0] + num_items)] - keys_of[row, 0]
        rng = np.random.default_rng((seed, int(users[row]), int(targets[row])))
        draws[row] = sample_unseen(rng, num_items, seen, count)
    return draws


def sample_unseen(rng: np.random.Generator, num_items: int, seen: np.ndarray, count: int) -> np.ndarray:
    """`count` distinct items not in `seen` (sorted or not). Raises if the catalogue is too small."""
    available = num_items - len(np.unique(seen))
    if available < count:
        raise ValueError(f"only {available} unseen items, cannot sample {count} negatives")
    chosen: np.ndarray = np.empty(0, dtype=np.int64)
    while len(chosen) < count:
        draw = rng.integers(0, num_items, size=2 * count)
        draw = draw[~np.isin(draw, seen)]
        chosen = np.unique(np.r_[chosen, draw])
    return rng.permutation(chosen)[:count]
