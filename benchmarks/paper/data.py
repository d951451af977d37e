"""Offline data for the paper experiments: Fashion-MNIST (Debian package) and ListOps.

* Fashion-MNIST is read from the files of Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist``); nothing is downloaded. ``FASHION_MNIST_DIR``
  points elsewhere if the files live somewhere else.
* ListOps is generated here, seeded, following the definition of Long Range Arena
  (Tay et al. 2021, ``lra_benchmarks/data/listops.py``): nested ``MAX``, ``MIN``,
  ``MED`` (median) and ``SM`` (sum modulo 10) over the digits 0-9, depth up to 10, 2 to
  10 arguments per operator, a value instead of an operator with probability 0.25 at
  each node (always at the maximum depth), trees rejected until their length (tokens,
  brackets included) lies in ``[min_len, max_len]``; the label is the value, a digit.

Both return plain NumPy arrays; the models turn them into tensors.
"""

from __future__ import annotations

import gzip
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class DataMissing(RuntimeError):
    """A data set is not installed; the message says how to install it."""


# ----------------------------------------------------------------------------- Fashion-MNIST
def fashion_mnist_dir() -> Path:
    """The directory that holds the four ``*-ubyte.gz`` files of Fashion-MNIST."""
    candidates = [os.environ["FASHION_MNIST_DIR"]] if os.environ.get("FASHION_MNIST_DIR") else []
    candidates += list(FASHION_MNIST_DIRS)
    need = (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    )
    for c in candidates:
        p = Path(c)
        if all((p / n).is_file() for n in need):
            return p
    raise DataMissing(
        "Fashion-MNIST not found (looked in "
        + ", ".join(candidates)
        + "). It comes from Debian's package `dataset-fashion-mnist`: install it with "
        "`sudo apt-get install -y dataset-fashion-mnist` (files land in "
        "/usr/share/datasets/fashion-mnist), or set FASHION_MNIST_DIR to a directory "
        "with train-/t10k- images/labels idx .gz files."
    )


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        return np.frombuffer(fh.read(), dtype=np.uint8, offset=offset)


def load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 784)`` uint8 (row-major 28 x 28) and labels ``(N,)`` uint8."""
    kind = {"train": "train", "test": "t10k"}[split]
    root = fashion_mnist_dir()
    labels = _read_idx(root / f"{kind}-labels-idx1-ubyte.gz", 8)
    images = _read_idx(root / f"{kind}-images-idx3-ubyte.gz", 16).reshape(len(labels), 784)
    return images, labels


def fashion_mnist_subset(split: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed, class-stratified random subset of ``n`` examples (all if ``n`` >= N)."""
    x, y = load_fashion_mnist(split)
    if n >= len(y):
        return x.copy(), y.astype(np.int64)
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(y == c)) for c in range(10)]
    take = np.concatenate([idx[: n // 10 + (1 if c < n % 10 else 0)] for c, idx in enumerate(per_class)])
    take = rng.permutation(take)
    return x[take].copy(), y[take].astype(np.int64)


# ----------------------------------------------------------------------------- ListOps
MIN, MAX, MED, SM = "[MIN", "[MAX", "[MED", "[SM"
END = "]"
OPERATORS = (MIN, MAX, MED, SM)
VALUES = tuple(range(10))
VALUE_P = 0.25

#: token ids: 0 = padding, 1 = class token, then digits, operators and the closing bracket
PAD, CLS = 0, 1
VOCAB = ("<pad>", "<cls>", *(str(v) for v in VALUES), *OPERATORS, END)
TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}


def _tree(rng: random.Random, depth: int, max_depth: int, max_args: int, budget: int) -> tuple[object, int]:
    """An LRA ListOps tree and its length in tokens (operator, values, closing bracket).

    ``budget`` stops the recursion early once a tree is certainly too long (the tree is
    then rejected by the caller anyway); it does not change which trees are accepted.
    """
    r = rng.random() if depth < max_depth else 1.0
    if r > VALUE_P:
        return rng.choice(VALUES), 1
    length = 2
    n_args = rng.randint(2, max_args)
    args = []
    for _ in range(n_args):
        sub, sub_len = _tree(rng, depth + 1, max_depth, max_args, budget - length)
        args.append(sub)
        length += sub_len
        if length > budget:
            return None, length
    op = rng.choice(OPERATORS)
    return (op, args), length


def evaluate(tree: object) -> int:
    """The value of a ListOps tree (LRA semantics: MED is ``int(np.median)``, SM is mod 10)."""
    if isinstance(tree, int):
        return tree
    op, args = tree
    vals = [evaluate(a) for a in args]
    if op == MAX:
        return max(vals)
    if op == MIN:
        return min(vals)
    if op == MED:
        return int(np.median(vals))
    if op == SM:
        return sum(vals) % 10
    raise ValueError(f"unknown operator {op!r}")


def to_tokens(tree: object) -> list[str]:
    """``[MAX 2 [MIN 4 7 ] 0 ]`` as a list of tokens (LRA's string without its parentheses)."""
    if isinstance(tree, int):
        return [str(tree)]
    op, args = tree
    out = [op]
    for a in args:
        out += to_tokens(a)
    out.append(END)
    return out


@dataclass(frozen=True)
class ListOpsSpec:
    n: int
    min_len: int = 500
    max_len: int = 2000
    max_depth: int = 10
    max_args: int = 10
    seed: int = 0


def generate_listops(spec: ListOpsSpec) -> tuple[list[list[str]], np.ndarray]:
    """``spec.n`` expressions (token lists) with lengths in ``[min_len, max_len]`` and their answers.

    Deterministic for a given spec (Python's ``random.Random(seed)``).
    """
    if not 1 <= spec.min_len <= spec.max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {spec.min_len}, {spec.max_len}")
    rng = random.Random(spec.seed)
    seqs: list[list[str]] = []
    labels: list[int] = []
    tries = 0
    while len(seqs) < spec.n:
        tries += 1
        if tries > 10_000 * max(spec.n, 1):
            raise RuntimeError(f"ListOps: too few trees with lengths in [{spec.min_len}, {spec.max_len}]")
        tree, length = _tree(rng, 1, spec.max_depth, spec.max_args, spec.max_len)
        if tree is None or not spec.min_len <= length <= spec.max_len:
            continue
        toks = to_tokens(tree)
        assert len(toks) == length
        seqs.append(toks)
        labels.append(evaluate(tree))
    return seqs, np.asarray(labels, dtype=np.int64)


def encode_listops(seqs: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ``(N, 1 + max_len)`` with a leading class token, right-padded with 0; lengths ``(N,)``."""
    L = 1 + max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), L), dtype=np.int64)
    lengths = np.zeros(len(seqs), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, 0] = CLS
        ids[i, 1 : 1 + len(s)] = [TOKEN_ID[t] for t in s]
        lengths[i] = 1 + len(s)
    return ids, lengths
