r"""Kernel feature maps for linear attention.

A feature map turns ``(..., L, D)`` into features ``(..., L, F)`` so that the
attention kernel factorises, $K(q, k) = \phi_q(q) \cdot \phi_k(k)$, and
attention costs O(L F Dv) instead of O(L^2) (Katharopoulos et al. 2020, "Transformers
are RNNs: Fast Autoregressive Transformers with Linear Attention", ICML).

Every map exposes ``queries(x)``, ``keys(x)`` (equal for symmetric maps), ``features(d)``
(its ``F`` for input width ``d``), a ``name`` and a ``signature`` (the name with its
parameters, stored in decoding states). Maps are made by the functions below; the
parameter-free ones can be named by a string in ``linear_attention``. A plain callable
is accepted as a symmetric map.

The *exponential* maps (``sikf``, ``favor``) are defined by their logarithm; their
``queries``/``keys`` subtract stabilising offsets that cancel in attention's
normalisation (a constant per query row, and one constant per sequence for keys).
``linear_attention`` does not call them: it works on the logarithms directly and
chooses per-feature offsets itself (see ``fastrpb.attention``).

Half-precision inputs are computed in float32 and returned in the input dtype.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias

from . import _validate
from ._compat import compute_dtype, device_of, elu_plus_one, namespace, softmax
from ._random import seeded_projection
from ._typing import Array
from ._validate import check_floating, int_arg

__all__ = [
    "FeatureMap",
    "ELU",
    "ReLU",
    "SIKF",
    "DPFP",
    "FAVOR",
    "RFF",
    "Taylor",
    "Hedgehog",
    "elu",
    "relu",
    "sikf",
    "dpfp",
    "favor",
    "rff",
    "taylor",
    "hedgehog",
    "random_projection",
    "resolve",
    "NAMES",
]


def _zero(xp: Any, x: Any) -> Any:
    return xp.zeros((), dtype=x.dtype, device=device_of(x))


def _relu(xp: Any, x: Any) -> Any:
    return xp.maximum(x, _zero(xp, x))


class FeatureMap:
    """Base of the feature maps: public entry points around private array kernels.

    Subclasses implement ``_queries(xp, x)`` and ``_keys(xp, x)`` on arrays already
    in the compute dtype (exponential maps implement ``_log_queries``/``_log_keys``
    instead), ``features(d)`` and, if they hold arrays, ``_arrays()``.

    Examples
    --------
    Every map has ``queries``, ``keys`` and ``features``; a plain callable passed as
    ``feature_map=`` becomes a symmetric map:

    >>> import numpy as np
    >>> from fastrpb import feature_maps as fm
    >>> m = fm.resolve(lambda x: x * x)
    >>> m.queries(np.array([[1.0, -2.0]]))
    array([[1., 4.]])
    """

    name: ClassVar[str] = "feature map"
    #: True for maps defined as ``exp`` of a log-feature (``sikf``, ``favor``).
    exponential: ClassVar[bool] = False
    #: True for maps whose features are never negative (``elu``, ``relu``, ``dpfp``,
    #: ``hedgehog``, the exponential maps): a causal normaliser of theirs is a sum of
    #: non-negative terms and needs no wider accumulation (``fastrpb.attention``).
    nonnegative: ClassVar[bool] = False
    #: The arrays (names in ``_arrays()``) that are learned, as ``hedgehog``'s ``W``: the
    #: layers make them trained parameters; the others (``favor``'s and ``rff``'s random
    #: projections) stay fixed buffers.
    learned: ClassVar[tuple[str, ...]] = ()

    # -- public ---------------------------------------------------------------
    def queries(self, x: Array) -> Array:
        """Query features ``(..., L, F)`` of ``x: (..., L, D)``."""
        return self._public(x, self._queries)

    def keys(self, x: Array) -> Array:
        """Key features ``(..., L, F)`` of ``x: (..., L, D)``."""
        return self._public(x, self._keys)

    def features(self, d: int) -> int | None:
        """The number of features ``F`` for input width ``d``."""
        raise NotImplementedError

    @property
    def signature(self) -> str:
        """The name with its parameters; decoding states record it."""
        return self.name

    # -- private --------------------------------------------------------------
    def _public(self, x: Any, kernel: Callable[[Any, Any], Any]) -> Any:
        _validate.required(x=x)
        xp = namespace(x=x, **self._arrays())
        _validate.values(xp, "x", x, ndim=1)
        self._check_width(x.shape[-1], "x")
        result, work = compute_dtype(xp, x)
        out = kernel(xp, xp.astype(x, work, copy=False))
        return xp.astype(out, result, copy=False)

    def _arrays(self) -> dict[str, Any]:
        """Arrays held by the map, named for namespace/device checks."""
        return {}

    def _check_width(self, d: int, name: str) -> None:
        """Reject an input width the map cannot take (maps with a projection)."""

    def _queries(self, xp: Any, x: Any) -> Any:
        if self.exponential:
            lx = self._log_queries(xp, x)
            # one offset per row (query): its largest feature becomes 1
            return xp.exp(lx - xp.max(lx, axis=-1, keepdims=True))
        raise NotImplementedError

    def _keys(self, xp: Any, x: Any) -> Any:
        if self.exponential:
            lx = self._log_keys(xp, x)
            # one offset shared by every key of the sequence (and every feature); a 1-d
            # input is a sequence of one key
            axes = (-1,) if lx.ndim < 2 else (-2, -1)
            if any(lx.shape[a] == 0 for a in axes):
                return xp.exp(lx)
            return xp.exp(lx - xp.max(lx, axis=axes, keepdims=True))
        raise NotImplementedError

    def _log_queries(self, xp: Any, x: Any) -> Any:
        raise NotImplementedError

    def _log_keys(self, xp: Any, x: Any) -> Any:
        raise NotImplementedError


# --------------------------------------------------------------------------- maps
@dataclass(frozen=True)
class ELU(FeatureMap):
    r"""``elu(x) + 1`` (Katharopoulos et al. 2020, "Transformers are RNNs"), F = D.

    $$
    \phi(x) = \begin{cases} x + 1 & x > 0 \\ e^{x} & x \le 0 \end{cases}
    $$

    Computed as ``exp(min(x, 0)) + max(x, 0)``, which is ``where(x > 0, x + 1, exp(x))``
    bit for bit (``1 + x`` for ``x > 0``, ``exp(x) + 0`` otherwise): no ``exp(x) - 1 + 1``
    round trip (which loses the small values in bfloat16), no ``exp`` of a large
    positive ``x`` (whose ``inf`` would turn gradients into ``inf * 0``), and no
    boolean mask and select, which cost more than the whole map on CPU backends.
    """

    name: ClassVar[str] = "elu"
    nonnegative: ClassVar[bool] = True

    def features(self, d: int) -> int:
        return int_arg("d", d, minimum=0)

    def _queries(self, xp: Any, x: Any) -> Any:
        # exp(min(x, 0)) + max(x, 0), with native fast paths where a library has them
        return elu_plus_one(xp, x)

    _keys = _queries


@dataclass(frozen=True)
class ReLU(FeatureMap):
    r"""``relu(x) = max(x, 0)``, F = D.

    A row whose features are all zero has no attention mass; ``linear_attention``
    then returns zeros for it (the denominator is guarded).
    """

    name: ClassVar[str] = "relu"
    nonnegative: ClassVar[bool] = True

    def features(self, d: int) -> int:
        return int_arg("d", d, minimum=0)

    def _queries(self, xp: Any, x: Any) -> Any:
        return _relu(xp, x)

    _keys = _queries


@dataclass(frozen=True)
class SIKF(FeatureMap):
    r"""The shift-invariant kernel of FastRPB, $\phi(x) = e^{x - c}$, F = D.

    $$
    K(q, k) = \sum_f e^{q_f} e^{k_f}
    $$

    Attention with this kernel is invariant to adding a constant to a query row or
    to all keys of a sequence, exactly as softmax attention is (Zubkov & Gavrilov
    2022, "FastRPB: a Scalable Relative Positional Encoding for Long Sequence
    Tasks", arXiv:2202.11364). The offsets ``c`` only keep ``exp`` in range and cancel
    in the normalisation: ``queries`` uses each row's maximum, ``keys`` the maximum
    over the whole sequence. (The paper's code subtracts a mean, which overflows for
    large logits.) ``linear_attention`` picks finer offsets (per feature, looking
    only back in causal mode); see ``fastrpb.attention``.
    """

    name: ClassVar[str] = "sikf"
    nonnegative: ClassVar[bool] = True
    exponential: ClassVar[bool] = True

    def features(self, d: int) -> int:
        return int_arg("d", d, minimum=0)

    def _log_queries(self, xp: Any, x: Any) -> Any:
        return x

    _log_keys = _log_queries


@dataclass(frozen=True)
class DPFP(FeatureMap):
    r"""Deterministic parameter-free projection (Schlag, Irie & Schmidhuber 2021,
    "Linear Transformers Are Secretly Fast Weight Programmers", ICML), F = 2 D nu.

    $$
    r(x) = [\mathrm{relu}(x), \mathrm{relu}(-x)] \in \mathbb{R}^{2D}, \quad
    \phi(x) = [\, r(x) \odot \mathrm{roll}(r(x), i) \,]_{i = 1..\nu}
    $$

    Parameters
    ----------
    nu : int
        Number of rolls; ``F = 2 D nu``. Made with ``dpfp(nu)``.
    """

    nu: int = 1
    name: ClassVar[str] = "dpfp"
    nonnegative: ClassVar[bool] = True

    def __post_init__(self) -> None:
        int_arg("nu", self.nu, minimum=1)

    @property
    def signature(self) -> str:
        return f"dpfp(nu={self.nu})"

    def features(self, d: int) -> int:
        return 2 * int_arg("d", d, minimum=0) * self.nu

    def _queries(self, xp: Any, x: Any) -> Any:
        r = xp.concat([_relu(xp, x), _relu(xp, -x)], axis=-1)
        return xp.concat([r * xp.roll(r, i, axis=-1) for i in range(1, self.nu + 1)], axis=-1)

    _keys = _queries


class _Projected(FeatureMap):
    """A map holding an explicit ``(m, d)`` projection."""

    projection: Any

    def _arrays(self) -> dict[str, Any]:
        return {"projection": self.projection}

    def _check_width(self, d: int, name: str) -> None:
        m, width = self.projection.shape
        if d != width:
            raise ValueError(
                f"{name} has width D = {d} but the {self.name} projection has shape "
                f"(m, d) = ({m}, {width}); it needs d == D"
            )

    def _project(self, xp: Any, x: Any) -> Any:
        w = xp.astype(self.projection, x.dtype, copy=False)
        return xp.matmul(x, xp.matrix_transpose(w))

    @property
    def signature(self) -> str:
        m, d = self.projection.shape
        return f"{self.name}(m={m}, d={d})"


def _check_projection(projection: Any) -> None:
    _validate.required(projection=projection)
    xp = namespace(projection=projection)
    check_floating(xp, "projection", projection)
    if projection.ndim != 2 or projection.shape[0] < 1 or projection.shape[1] < 1:
        raise ValueError(f"projection must have shape (m, d) with m, d >= 1, got shape {tuple(projection.shape)}")


@dataclass(frozen=True, eq=False)
class FAVOR(_Projected):
    r"""Performer FAVOR+ positive random features for the softmax kernel, F = m.

    $$
    \phi(x) = \frac{1}{\sqrt m} \exp\!\big(W x - \tfrac{|x|^2}{2} - c\big), \qquad
    \mathbb{E}_W[\phi(q) \cdot \phi(k)] = e^{q \cdot k} e^{-c_q - c_k}
    $$

    with rows of ``W`` distributed as ``N(0, I)`` (``random_projection``; orthogonal
    rows lower the variance). The stabilisers ``c`` cancel in attention's
    normalisation: one per query row, one shared by all keys of a sequence
    (Choromanski et al. 2021, "Rethinking Attention with Performers", ICLR).
    The kernel is ``exp(q . k)``: to approximate ``softmax_attention``'s default
    ``scale = 1/sqrt(D)``, multiply ``q`` and ``k`` by ``D ** -0.25`` first.

    Parameters
    ----------
    projection : array, shape (m, D)
        Rows distributed as ``N(0, I)`` (``random_projection``). Made with ``favor(projection)``.
    """

    projection: Array
    name: ClassVar[str] = "favor"
    nonnegative: ClassVar[bool] = True
    exponential: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_projection(self.projection)

    def features(self, d: int) -> int:
        return self.projection.shape[0]

    def _log_queries(self, xp: Any, x: Any) -> Any:
        m = self.projection.shape[0]
        return self._project(xp, x) - (xp.sum(x * x, axis=-1, keepdims=True) * 0.5 + 0.5 * math.log(m))

    _log_keys = _log_queries


@dataclass(frozen=True, eq=False)
class RFF(_Projected):
    r"""Random Fourier features for the Gaussian kernel (Rahimi & Recht 2007,
    "Random Features for Large-Scale Kernel Machines", NeurIPS), F = 2 m.

    $$
    \phi(x) = \frac{1}{\sqrt m} [\cos(W x), \sin(W x)], \qquad
    \mathbb{E}_W[\phi(x) \cdot \phi(y)] = e^{-|x - y|^2 / 2}
    $$

    with rows of ``W`` distributed as ``N(0, I)``. Unlike the other maps these
    features are not non-negative: the kernel estimate, and so a linear-attention
    denominator, can be small or negative for a finite ``m``. Use it as a kernel
    estimate (or with inputs whose kernel values are well away from zero).

    Parameters
    ----------
    projection : array, shape (m, D)
        Rows distributed as ``N(0, I)`` (``random_projection``). Made with ``rff(projection)``.
    """

    projection: Array
    name: ClassVar[str] = "rff"

    def __post_init__(self) -> None:
        _check_projection(self.projection)

    def features(self, d: int) -> int:
        return 2 * self.projection.shape[0]

    def _queries(self, xp: Any, x: Any) -> Any:
        wx = self._project(xp, x)
        scale = 1.0 / math.sqrt(self.projection.shape[0])
        return xp.concat([xp.cos(wx), xp.sin(wx)], axis=-1) * scale

    _keys = _queries


@functools.lru_cache(maxsize=64)
def _pairs(d: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Row and column indices of the pairs ``i < j`` of ``d`` features, row by row."""
    pairs = [(i, j) for i in range(d) for j in range(i + 1, d)]
    return tuple(i for i, _ in pairs), tuple(j for _, j in pairs)


@dataclass(frozen=True)
class Taylor(FeatureMap):
    r"""Second-order Taylor features of ``exp`` (Based: Arora et al. 2024, "Simple linear
    attention language models balance the recall-throughput tradeoff", ICML),
    F = 1 + D + D (D + 1) / 2.

    $$
    \phi(x) = \Big[\,1,\; \frac{x}{D^{1/4}},\;
    \Big(\frac{x_i^2}{\sqrt{2 D}}\Big)_{i},\;
    \Big(\frac{x_i x_j}{\sqrt{D}}\Big)_{i < j}\Big], \qquad
    \phi(q) \cdot \phi(k) = 1 + s + \frac{s^2}{2} \approx e^{s}, \quad
    s = \frac{q \cdot k}{\sqrt D}
    $$

    The scaling is flash-linear-attention's ``TaylorFeatureMap`` (and Based's): the
    kernel expands ``exp(q . k / sqrt(D))``, softmax attention's default logits, so
    ``q`` and ``k`` are passed unscaled. Features come in fla's order (the constant,
    the linear terms, the squares, then the products ``i < j`` row by row); the
    symmetric quadratic block keeps D (D + 1) / 2 features instead of Based's D^2.
    The features are signed but the kernel is positive,
    ``1 + s + s^2 / 2 >= 1 / 2``, so the normaliser never vanishes.
    """

    name: ClassVar[str] = "taylor"

    def features(self, d: int) -> int:
        d = int_arg("d", d, minimum=0)
        return 1 + d + d * (d + 1) // 2

    def _queries(self, xp: Any, x: Any) -> Any:
        d = x.shape[-1]
        parts = [xp.ones((*x.shape[:-1], 1), dtype=x.dtype, device=device_of(x))]
        if d:
            parts += [x * (d**-0.25), x * x * ((2 * d) ** -0.5)]
        if d > 1:
            # the products x_i x_j, i < j, row by row (numpy.triu_indices(d, 1) order)
            rows, cols = (xp.asarray(ix, dtype=xp.int32, device=device_of(x)) for ix in _pairs(d))
            parts.append(xp.take(x, rows, axis=-1) * xp.take(x, cols, axis=-1) * (d**-0.5))
        return xp.concat(parts, axis=-1)

    _keys = _queries


@dataclass(frozen=True, eq=False)
class Hedgehog(_Projected):
    r"""Hedgehog features (Zhang et al. 2024, "The Hedgehog & the
    Porcupine: Expressive Linear Attentions with Softmax Mimicry", ICLR), F = 2 m.

    $$
    \phi(x) = \big[\,\mathrm{softmax}(W x),\; \mathrm{softmax}(-W x)\,\big]
    $$

    each softmax over the ``m`` features, with a learned ``W`` of shape ``(m, D)``
    (``torch.nn.Linear(D, m).weight``'s layout, as ``favor``'s projection; the paper
    and fla initialise it to the identity). Every feature lies in [0, 1] and each
    half sums to one, so the map never overflows. The two softmaxes are taken
    separately, as in the paper; flash-linear-attention's ``HedgehogFeatureMap``
    instead takes one softmax over the joined ``[2 W x + b, -2 W x - b]``, with a
    bias ``b``.

    Parameters
    ----------
    projection : array, shape (m, D)
        The learned ``W``. Made with ``hedgehog(projection)``.
    """

    projection: Array
    name: ClassVar[str] = "hedgehog"
    nonnegative: ClassVar[bool] = True
    learned: ClassVar[tuple[str, ...]] = ("projection",)

    def __post_init__(self) -> None:
        _check_projection(self.projection)

    def features(self, d: int) -> int:
        return 2 * self.projection.shape[0]

    def _queries(self, xp: Any, x: Any) -> Any:
        wx = self._project(xp, x)
        return xp.concat([softmax(xp, wx), softmax(xp, -wx)], axis=-1)

    _keys = _queries


@dataclass(frozen=True, eq=False)
class _Callable(FeatureMap):
    """A plain callable used as a symmetric map (same features for queries and keys)."""

    function: Callable[[Any], Any]
    name: ClassVar[str] = "callable"

    @property
    def signature(self) -> str:
        # a Python function's name from its code object: Dynamo (torch.compile) traces a
        # function's ``__qualname__`` to the attribute's descriptor, not the string, and
        # the label must be the same eagerly and compiled (a state records it)
        code = getattr(self.function, "__code__", None)
        if code is not None:
            label = getattr(code, "co_qualname", code.co_name)  # co_qualname: Python 3.11+
        else:
            label = getattr(self.function, "__qualname__", None) or type(self.function).__qualname__
        return f"callable({label})"

    def features(self, d: int) -> None:
        """Unknown: a plain callable does not declare its width."""
        return None

    def _queries(self, xp: Any, x: Any) -> Any:
        out = self.function(x)
        label = f"the output of feature_map {self.signature}"
        namespace(**{"the input": x, label: out})
        check_floating(xp, label, out)
        if out.ndim != x.ndim or tuple(out.shape[:-1]) != tuple(x.shape[:-1]):
            got = tuple(out.shape)
            raise ValueError(
                f"feature_map {self.signature} must return an array of shape "
                f"{(*x.shape[:-1], 'F')} for input shape {tuple(x.shape)}, got {got}"
            )
        return xp.astype(out, x.dtype, copy=False)

    _keys = _queries


FeatureMapLike: TypeAlias = "str | FeatureMap | Callable[[Array], Array]"
"""What a ``feature_map=`` argument accepts: a map's name (``"elu"``, ``"relu"``,
``"sikf"``, ``"dpfp"``, ``"taylor"``), a ``FeatureMap``, or a plain callable used as a
symmetric map."""


# --------------------------------------------------------------------------- factories
def elu() -> FeatureMap:
    """``elu(x) + 1`` features (Katharopoulos et al. 2020), F = D. See ``ELU``.

    Returns
    -------
    FeatureMap

    Examples
    --------
    >>> import numpy as np
    >>> from fastrpb import feature_maps as fm
    >>> np.round(fm.elu().queries(np.array([-1.0, 0.0, 2.0])), 4)
    array([0.3679, 1.    , 3.    ])
    """
    return ELU()


def relu() -> FeatureMap:
    """``relu(x)`` features, F = D. See ``ReLU``.

    Returns
    -------
    FeatureMap

    Examples
    --------
    >>> import numpy as np
    >>> from fastrpb import feature_maps as fm
    >>> fm.relu().queries(np.array([-1.0, 0.0, 2.0]))
    array([0., 0., 2.])
    """
    return ReLU()


def sikf() -> FeatureMap:
    """The shift-invariant kernel ``exp(x - c)`` of FastRPB (arXiv:2202.11364), F = D. See ``SIKF``.

    Returns
    -------
    FeatureMap

    Examples
    --------
    The query features are scaled so that a row's largest is 1 (the constant cancels in
    the attention's normalisation):

    >>> import numpy as np
    >>> from fastrpb import feature_maps as fm
    >>> np.round(fm.sikf().queries(np.array([0.0, 1.0, 2.0])), 4)
    array([0.1353, 0.3679, 1.    ])
    """
    return SIKF()


def dpfp(nu: int = 1) -> FeatureMap:
    """Deterministic parameter-free projection (Schlag et al. 2021), F = 2 D nu. See ``DPFP``.

    Returns
    -------
    FeatureMap

    Raises
    ------
    TypeError
        If ``nu`` is not an int.
    ValueError
        If ``nu`` is below 1.

    Examples
    --------
    >>> import numpy as np
    >>> from fastrpb import feature_maps as fm
    >>> m = fm.dpfp(nu=2)
    >>> m.features(4), m.queries(np.ones((3, 4))).shape
    (16, (3, 16))
    """
    return DPFP(int_arg("nu", nu, minimum=1))


def favor(projection: Array) -> FeatureMap:
    """Performer FAVOR+ positive random features for ``exp(q . k)``, F = m. See ``FAVOR``.

    Parameters
    ----------
    projection : array, shape (m, D)
        Rows distributed as ``N(0, I)``, e.g. ``random_projection(m, D, seed=..., like=q)``.

    Returns
    -------
    FeatureMap

    Raises
    ------
    TypeError
        If ``projection`` is not real floating.
    ValueError
        If ``projection`` is not two-dimensional with ``m, D >= 1``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastrpb import feature_maps as fm
    >>> x = np.zeros((5, 4))
    >>> m = fm.favor(fm.random_projection(16, 4, seed=0, like=x))
    >>> m.features(4), m.keys(x).shape
    (16, (5, 16))
    """
    return FAVOR(projection)


def rff(projection: Array) -> FeatureMap:
    """Random Fourier features for ``exp(-|x - y|^2 / 2)``, F = 2 m. See ``RFF``.

    Parameters
    ----------
    projection : array, shape (m, D)
        Rows distributed as ``N(0, I)``, e.g. ``random_projection(m, D, seed=..., like=x)``.

    Returns
    -------
    FeatureMap

    Raises
    ------
    TypeError
        If ``projection`` is not real floating.
    ValueError
        If ``projection`` is not two-dimensional with ``m, D >= 1``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastrpb import feature_maps as fm
    >>> x = np.zeros((5, 4))
    >>> m = fm.rff(fm.random_projection(16, 4, seed=0, like=x))
    >>> m.features(4), m.queries(x).shape
    (32, (5, 32))
    """
    return RFF(projection)


def taylor() -> FeatureMap:
    """Second-order Taylor features of ``exp(q . k / sqrt(D))`` (Based; Arora et al. 2024),
    F = 1 + D + D (D + 1) / 2. See ``Taylor``.

    Returns
    -------
    FeatureMap

    Examples
    --------
    >>> import numpy as np
    >>> from fastrpb import feature_maps as fm
    >>> fm.taylor().features(4), fm.taylor().queries(np.ones((3, 4))).shape
    (15, (3, 15))
    """
    return Taylor()


def hedgehog(projection: Array) -> FeatureMap:
    """Hedgehog features ``[softmax(W x), softmax(-W x)]`` (Zhang et al. 2024), F = 2 m.
    See ``Hedgehog``.

    Parameters
    ----------
    projection : array, shape (m, D)
        The learned ``W`` (``x`` is multiplied by its transpose); the paper starts
        from the identity, ``m = D``.

    Returns
    -------
    FeatureMap

    Raises
    ------
    TypeError
        If ``projection`` is not real floating.
    ValueError
        If ``projection`` is not two-dimensional with ``m, D >= 1``.

    Examples
    --------
    Each half of the features is a softmax, so it sums to 1:

    >>> import numpy as np
    >>> from fastrpb import feature_maps as fm
    >>> m = fm.hedgehog(np.eye(4))
    >>> phi = m.queries(np.array([[1.0, 2.0, 3.0, 4.0]]))
    >>> phi.shape, np.round(phi[:, :4].sum(), 6), np.round(phi[:, 4:].sum(), 6)
    ((1, 8), 1.0, 1.0)
    """
    return Hedgehog(projection)


def random_projection(m: int, d: int, *, seed: int, orthogonal: bool = True, like: Array) -> Array:
    """An ``(m, d)`` random projection whose rows are marginally ``N(0, I_d)``.

    With ``orthogonal=True`` (the default, Performer's "orthogonal random features")
    rows come in blocks of ``d`` exactly orthogonal directions (QR of a Gaussian block)
    with independent chi-distributed norms: unbiased like i.i.d. rows, with lower
    variance (Choromanski et al. 2021, "Rethinking Attention with Performers").
    ``orthogonal=False`` gives i.i.d. Gaussian rows.

    Parameters
    ----------
    m, d : int
        Number of random features and input width.
    seed : int
        Seed of NumPy's ``default_rng``; the same numbers on every backend.
    orthogonal : bool
        Orthogonal blocks (default) or i.i.d. rows.
    like : array
        The projection is created in the namespace, on the device and (if floating)
        in the dtype of ``like``.

    Returns
    -------
    array, shape (m, d)

    Raises
    ------
    TypeError
        If ``m``, ``d`` or ``seed`` is not an int, or ``orthogonal`` is not a bool.
    ValueError
        If ``m`` or ``d`` is below 1, or ``like`` is missing.

    Examples
    --------
    >>> import numpy as np
    >>> from fastrpb import feature_maps as fm
    >>> w = fm.random_projection(8, 4, seed=0, like=np.zeros(1, dtype=np.float32))
    >>> w.shape, w.dtype
    ((8, 4), dtype('float32'))
    >>> g = w[:4] @ w[:4].T  # one orthogonal block: a diagonal Gram matrix
    >>> bool(np.allclose(g - np.diag(np.diag(g)), 0, atol=1e-5))
    True
    """
    m = _validate.integer("m", m, minimum=1)
    d = _validate.integer("d", d, minimum=1)
    seed = _validate.seed(seed)
    orthogonal = _validate.flag("orthogonal", orthogonal)
    _validate.required(like=like)
    xp = namespace(like=like)
    dtype = like.dtype if xp.isdtype(like.dtype, "real floating") else xp.float32
    return seeded_projection(xp, m, d, seed=seed, orthogonal=orthogonal, dtype=dtype, device=device_of(like))


_BY_NAME: dict[str, Callable[[], FeatureMap]] = {
    "elu": elu,
    "relu": relu,
    "sikf": sikf,
    "dpfp": dpfp,
    "taylor": taylor,
}
#: The names ``linear_attention(feature_map=...)`` accepts.
NAMES: tuple[str, ...] = tuple(_BY_NAME)


def resolve(feature_map: FeatureMapLike, name: str = "feature_map") -> FeatureMap:
    """A ``FeatureMap`` from a map, one of ``NAMES``, or a plain callable (symmetric).

    Parameters
    ----------
    feature_map : str, FeatureMap or callable
        What a ``feature_map=`` argument accepts (``FeatureMapLike``).
    name : str
        The argument's name, for the error messages.

    Returns
    -------
    FeatureMap

    Raises
    ------
    ValueError
        If ``feature_map`` is a string not in ``NAMES``.
    TypeError
        If ``feature_map`` is not a map, a name or a callable (a map class or an uncalled
        factory included).

    Examples
    --------
    >>> from fastrpb import feature_maps as fm
    >>> fm.resolve("dpfp").signature
    'dpfp(nu=1)'
    >>> fm.resolve(fm.elu()).features(8)
    8
    """
    if isinstance(feature_map, FeatureMap):
        return feature_map
    if isinstance(feature_map, str):
        try:
            return _BY_NAME[feature_map]()
        except KeyError:
            if feature_map in ("favor", "rff", "hedgehog"):
                raise ValueError(
                    f"{name} {feature_map!r} needs a projection matrix, so it has no name alone: pass "
                    f"{name}=fastrpb.feature_maps.{feature_map}(projection)"
                    + (" (the layers accept the name 'hedgehog' and own W)" if feature_map == "hedgehog" else "")
                ) from None
            raise ValueError(
                f"{name} {feature_map!r} is not a known feature map; valid names are "
                f"{', '.join(repr(n) for n in NAMES)} (or pass a map from fastrpb.feature_maps "
                "or a callable)"
            ) from None
    if isinstance(feature_map, type) and issubclass(feature_map, FeatureMap):
        raise TypeError(
            f"{name} must be a feature map, got the class {feature_map.__name__} itself: "
            f"make one with its factory, e.g. {name}=fastrpb.feature_maps.{feature_map.name}(...)"
        )
    if _is_factory(feature_map):
        raise TypeError(
            f"{name} must be a feature map, got the factory {feature_map.__name__} itself: call it, "
            f"{name}=fastrpb.feature_maps.{feature_map.__name__}(...) (a plain callable is used as "
            "the map, so an uncalled factory would be applied to the inputs)"
        )
    if callable(feature_map):
        return _Callable(feature_map)
    raise TypeError(
        f"{name} must be a feature-map name ({', '.join(NAMES)}), a map from "
        f"fastrpb.feature_maps or a callable, got {type(feature_map).__name__}"
    )


def _is_factory(value: Any) -> bool:
    """Whether ``value`` is a function that makes a feature map (``fastrpb.feature_maps.dpfp``):
    its return annotation says ``FeatureMap``."""
    annotations = getattr(value, "__annotations__", None) if inspect.isfunction(value) else None
    return annotations is not None and annotations.get("return") in ("FeatureMap", FeatureMap)
