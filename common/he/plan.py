"""The HE plan: what the seller's evaluator computes on slot-per-sample ciphertexts.

A plan is a sequence of polynomial stages and one output stage, all over a growing
*basis* of ciphertexts. The basis starts as the input columns (ciphertext j = column j
of every packed row). A `PolyStage` forms `u = W @ basis + b` for each unit (one
scalar-weighted sum per unit) and appends to the basis either the Chebyshev polynomials
T_1(u) .. T_D(u) (kind "chebyshev") or u*u alone (kind "square"); the activation itself,
sum_k c_k T_k(u), is folded by the compiler into the weights of the next stage, so it
costs no level of its own. The `OutputStage` forms the scores the same way.

A third kind, "series", serves activations that need high degrees (a kink such as ReLU's
on a wide guaranteed range): each unit adds one entry, sum_k c_k T_k(u) with the unit's
own coefficients, which OpenFHE evaluates by Paterson-Stockmeyer (about 2 sqrt(D)
multiplications instead of D, one entry in memory instead of D). It costs one level more
than T_D itself (`series_depth`).

Input encoding. The buyer encrypts each column as (x - input_offset) * input_scale, which
maps the column's range (the offer's domain, or the calibration rows') onto
+-INPUT_RANGE; the weights reading the inputs are rescaled to match, so the plan computes
the same function of x. A fresh encryption's error is absolute (~2e-6 at a 2^36 scale,
whatever the value): encrypted raw, a column with a small spread (breast-cancer's fractal
dimension: sigma 0.007) meets a large weight (a StandardScaler folded into a linear model
divides by sigma) that multiplies that error, which made raw-feature models miss their
tolerance. `simulate` and `range_excess` take raw rows; `encoded` is what is encrypted.

Weights are sparse (CSR): a convolution's map touches a few inputs per output. Everything
here is numpy/scipy: the gateway, the compiler and the buyer use it without OpenFHE.

Guaranteed ranges. A Chebyshev stage's u is normalized so that its approximation is fitted
on |u| <= 1, which the compiler guarantees for every row of the offer's input domain
(seller_server.compiler); a row whose u leaves it for any unit (one its buyer did not clip
to the domain) gets a result the approximation does not vouch for. Who is
at fault then must not depend on the seller's word, so the plan carries (1) its own ranges,
exactly: `range_excess` recomputes every row's max |u| in plaintext once the plan is
disclosed after payment, and (2) a *range check*, one more output the encrypted evaluation
computes at no extra level: mean over units of (1 + T_E(u)) / 2 = T_(E/2)(u)^2 with E the
largest even degree of the stage up to RANGE_CHECK_DEGREE, read from entries already in the
basis. On |u| <= 1 each
term is in [0, 1]; beyond, |T_n(u)| > 1 and grows like cosh(n acosh|u|); so a decrypted
range check above 1 (plus the computation's tolerance) proves the row left the ranges,
before any payment and without showing the seller the row or the buyer the weights. The
converse is approximate: a row that leaves one unit's range by a few percent may average
below 1; `range_excess` names it after payment. E stops at 8: a higher degree names a few
more rows but makes the check the largest value the results must hold (inverted digits on
digits-mlp: with T_12 the check reaches 2e4, beyond the scores' 233, with T_8 154; the
CKKS parameters hold 2^15).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zipfile
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import sparse

from common.errors import BadInput

FloatArray = npt.NDArray[np.float64]
Weights = Any  # scipy.sparse.csr_array of float64, (rows, basis size)
# each encrypted column spans +-INPUT_RANGE over its range: larger values shrink the share
# of the encryption's own error in every weighted sum, until rounding the rescaled weights
# (a packed plan's plaintext diagonals: ~5e-10 each at 2^36) costs as much
INPUT_RANGE = 64.0
STAGE_KINDS = ("chebyshev", "square", "series")
APPROXIMATING_KINDS = ("chebyshev", "series")
# OpenFHE's Paterson-Stockmeyer series: levels consumed by degree (upper bounds of each band,
# measured at 1.6.1 and as its documentation tabulates)
SERIES_DEPTHS = ((5, 3), (13, 4), (27, 5), (59, 6), (119, 7), (247, 8), (495, 9))
RANGE_CHECK_DEGREE = 8  # see "Guaranteed ranges" above


def as_weights(matrix: Any, columns: int | None = None) -> Weights:
    """A CSR float64 matrix, widened with zero columns to `columns` if given."""
    csr = sparse.csr_array(matrix, dtype=np.float64)
    csr.eliminate_zeros()
    if columns is not None and columns != csr.shape[1]:
        if columns < csr.shape[1]:
            raise ValueError("weights cannot be narrowed")
        csr = sparse.csr_array((csr.data, csr.indices, csr.indptr),
                               shape=(csr.shape[0], columns))
    return csr


def row_terms(weights: Weights, row: int) -> tuple[npt.NDArray[np.int64], FloatArray]:
    """(basis indices, weights) of one row's nonzero terms."""
    start, end = weights.indptr[row], weights.indptr[row + 1]
    return weights.indices[start:end].astype(np.int64), weights.data[start:end]


@dataclass(frozen=True)
class PolyStage:
    """u = weights @ basis + bias per unit; then T_1(u)..T_degree(u) (kind "chebyshev"),
    u*u (kind "square", degree 2) or sum_k coefficients[unit, k] T_k(u) (kind "series")
    join the basis."""

    weights: Weights  # (units, basis size before this stage)
    bias: FloatArray  # (units,)
    degree: int
    label: str = ""  # e.g. "tanh at 'Tanh': Chebyshev degree 12"
    kind: str = "chebyshev"
    coefficients: FloatArray | None = None  # series: (units, degree + 1), T_0 first

    @property
    def units(self) -> int:
        return int(self.weights.shape[0])

    @property
    def width(self) -> int:
        """Basis entries each unit adds."""
        return self.degree if self.kind == "chebyshev" else 1

    def entry_depths(self, u_depth: int) -> list[int]:
        """Depth of each entry a unit adds, given the depth of its u."""
        if self.kind == "square":
            return [u_depth + 1]
        if self.kind == "series":
            return [u_depth + series_depth(self.degree)]
        return [u_depth + chebyshev_depth(k) for k in range(1, self.degree + 1)]

    def entries(self, u: FloatArray) -> FloatArray:
        """Plaintext values of the entries the stage adds, unit-major."""
        if self.kind == "square":
            return np.square(u)
        if self.kind == "series":
            assert self.coefficients is not None
            return chebyshev_series(u, self.coefficients)
        return chebyshev_basis(u, self.degree)


@dataclass(frozen=True)
class OutputStage:
    weights: Weights  # (scores, basis size)
    bias: FloatArray  # (scores,)


@dataclass(frozen=True)
class HEPlan:
    input_count: int
    stages: tuple[PolyStage, ...]
    output: OutputStage
    notes: tuple[str, ...] = field(default=())
    range_check: bool = False  # the last output is the range check, not a model score
    # what is encrypted: (x - input_offset) * input_scale per column (None: x itself)
    input_offset: FloatArray | None = None
    input_scale: FloatArray | None = None

    # ----- shape -----

    def basis_size(self, stage_count: int | None = None) -> int:
        stages = self.stages if stage_count is None else self.stages[:stage_count]
        return self.input_count + sum(s.units * s.width for s in stages)

    @property
    def score_count(self) -> int:
        return int(self.output.weights.shape[0])

    def check(self) -> None:
        """Refuse plans whose shapes do not chain or that hold a NaN or infinite weight or
        bias (e.g. a corrupted cache file): such a plan's every result is meaningless."""
        if (self.input_offset is None) != (self.input_scale is None) or (
                self.input_scale is not None and self.input_offset is not None and not (
                    self.input_offset.shape == self.input_scale.shape == (self.input_count,)
                    and np.all(np.isfinite(self.input_offset))
                    and np.all(np.isfinite(self.input_scale)) and np.all(self.input_scale > 0))):
            raise BadInput(f"the plan's input encoding is not a finite offset and a positive "
                           f"scale for each of its {self.input_count} columns")
        size = self.input_count
        for index, stage in enumerate(self.stages):
            _check_finite(stage.weights, stage.bias,
                          f"plan stage {index + 1} ('{stage.label}')")
            if stage.weights.shape != (stage.units, size) or stage.bias.shape != (stage.units,):
                raise BadInput(f"plan stage '{stage.label}' has weights {stage.weights.shape}, "
                               f"expected ({stage.units}, {size})")
            if stage.kind not in STAGE_KINDS or stage.degree < 1 or (
                    stage.kind == "square" and stage.degree != 2):
                raise BadInput(f"plan stage '{stage.label}' has kind {stage.kind!r} and "
                               f"degree {stage.degree}")
            if (stage.kind == "series") != (stage.coefficients is not None) or (
                    stage.coefficients is not None and (
                        stage.coefficients.shape != (stage.units, stage.degree + 1)
                        or stage.degree > SERIES_DEPTHS[-1][0])):
                raise BadInput(f"plan stage '{stage.label}' has series coefficients that do "
                               f"not match its kind, units and degree")
            size += stage.units * stage.width
        _check_finite(self.output.weights, self.output.bias, "the plan's output stage")
        if self.output.weights.shape[1] != size:
            raise BadInput(f"plan output uses {self.output.weights.shape[1]} basis entries, "
                           f"expected {size}")
        if self.range_check:
            weights, bias = self._range_check_row()
            last = self.output.weights[[self.score_count - 1]]
            if (last != weights).nnz or self.output.bias[-1] != bias:
                raise BadInput("the plan's last output is not the range check it declares")

    # ----- input encoding (see the module's docstring) -----

    def with_input_encoding(self, offset: FloatArray, scale: FloatArray) -> HEPlan:
        """This plan (of raw columns) for columns encrypted as (x - offset) * scale: every
        weight reading column j is divided by scale_j, and offset_j times it moves into
        the bias, so the plan computes the same function of x."""
        if self.input_offset is not None:
            raise ValueError("the plan's inputs are encoded already")
        d = self.input_count

        def moved(weights: Weights, bias: FloatArray) -> tuple[Weights, FloatArray]:
            columns = np.ones(weights.shape[1])
            columns[:d] = 1.0 / scale
            return as_weights(weights @ sparse.diags(columns)), bias + weights[:, :d] @ offset

        stages = tuple(replace(s, weights=w, bias=b) for s in self.stages
                       for w, b in [moved(s.weights, s.bias)])
        weights, bias = moved(self.output.weights, self.output.bias)
        return replace(self, stages=stages, output=OutputStage(weights, bias),
                       input_offset=np.asarray(offset, dtype=np.float64),
                       input_scale=np.asarray(scale, dtype=np.float64))

    def encoded(self, rows: FloatArray) -> FloatArray:
        """What is encrypted of raw `rows`: (x - input_offset) * input_scale."""
        basis = np.asarray(rows, dtype=np.float64)
        if basis.ndim != 2 or basis.shape[1] != self.input_count:
            raise BadInput(f"plan expects rows with {self.input_count} columns, got {basis.shape}")
        if self.input_offset is None or self.input_scale is None:
            return basis
        return encode_columns(basis, self.input_offset, self.input_scale)

    # ----- guaranteed ranges (see the module's docstring) -----

    def with_range_check(self) -> HEPlan:
        """This plan with the range check appended as its last output (none is needed, and
        none is added, without Chebyshev stages)."""
        if self.range_check or not any(s.kind == "chebyshev" for s in self.stages):
            return self
        weights, bias = self._range_check_row()
        output = OutputStage(as_weights(sparse.vstack([self.output.weights, weights])),
                             np.append(self.output.bias, bias))
        return replace(self, output=output, range_check=True)

    def _range_check_row(self) -> tuple[Weights, float]:
        offset, columns, chebyshev_units = self.input_count, [], 0
        for stage in self.stages:
            if stage.kind == "chebyshev":
                # T_even >= -1 everywhere
                even = min(stage.degree - stage.degree % 2, RANGE_CHECK_DEGREE)
                columns += [offset + unit * stage.degree + even - 1
                            for unit in range(stage.units)]
                chebyshev_units += stage.units
            offset += stage.units * stage.width
        values = np.full(len(columns), 0.5 / max(chebyshev_units, 1))
        weights = sparse.csr_array((values, ([0] * len(columns), columns)), shape=(1, offset))
        return as_weights(weights), 0.5

    def range_excess(self, rows: FloatArray) -> FloatArray:
        """Each row's largest |u| over every approximated unit (above 1: the row left the
        ranges the plan's approximations are fitted on; 0 without approximations)."""
        basis = self.encoded(rows)
        excess = np.zeros(basis.shape[0])
        for stage in self.stages:
            u = (stage.weights @ basis.T).T + stage.bias
            if stage.kind in APPROXIMATING_KINDS and stage.units:
                excess = np.maximum(excess, np.abs(u).max(axis=1))
            basis = np.concatenate([basis, stage.entries(u)], axis=1)
        return excess

    # ----- depth and cost -----

    def basis_depths(self) -> list[int]:
        """Multiplicative depth at which each basis ciphertext becomes available."""
        depths = [0] * self.input_count
        for stage in self.stages:
            for unit in range(stage.units):
                u_depth = _combination_depth(stage.weights, unit, depths)
                depths.extend(stage.entry_depths(u_depth))
        return depths

    def depth(self) -> int:
        """Levels the whole evaluation consumes (the CKKS multiplicative depth it needs)."""
        depths = self.basis_depths()
        weights = self.output.weights
        return max(_combination_depth(weights, row, depths) for row in range(weights.shape[0]))

    def ciphertext_multiplications(self) -> int:
        def per_unit(stage: PolyStage) -> int:
            if stage.kind == "square":
                return 1
            if stage.kind == "series":  # Paterson-Stockmeyer: ~2 sqrt(D) + log2 D
                return 2 * math.isqrt(stage.degree) + stage.degree.bit_length()
            return max(stage.degree - 1, 0)
        return sum(stage.units * per_unit(stage) for stage in self.stages)

    def scalar_multiplications(self) -> int:
        return sum(int(s.weights.nnz) for s in self.stages) + int(self.output.weights.nnz)

    # ----- plaintext reference -----

    def simulate(self, rows: FloatArray) -> FloatArray:
        """What the encrypted evaluation computes, in float64 (rows: (n, input_count))."""
        basis = self.encoded(rows)
        for stage in self.stages:
            u = (stage.weights @ basis.T).T + stage.bias
            basis = np.concatenate([basis, stage.entries(u)], axis=1)
        result: FloatArray = (self.output.weights @ basis.T).T + self.output.bias
        return result


    # ----- storage -----

    def to_bytes(self) -> bytes:
        arrays: dict[str, Any] = {}
        meta = {"input_count": self.input_count, "notes": list(self.notes), "stages": [],
                "range_check": self.range_check}
        for name, weights, bias in [
                *((f"stage{i}", s.weights, s.bias) for i, s in enumerate(self.stages)),
                ("output", self.output.weights, self.output.bias)]:
            arrays |= {f"{name}_data": weights.data, f"{name}_indices": weights.indices,
                       f"{name}_indptr": weights.indptr,
                       f"{name}_shape": np.array(weights.shape), f"{name}_bias": bias}
        for i, stage in enumerate(self.stages):
            if stage.coefficients is not None:
                arrays[f"stage{i}_coefficients"] = stage.coefficients
        if self.input_offset is not None and self.input_scale is not None:
            arrays |= {"input_offset": self.input_offset, "input_scale": self.input_scale}
        for stage in self.stages:
            meta["stages"].append({"degree": stage.degree,  # type: ignore[attr-defined]
                                   "label": stage.label, "kind": stage.kind})
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> HEPlan:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                meta = json.loads(bytes(npz["meta"]).decode())

                def matrix(name: str) -> tuple[Weights, FloatArray]:
                    shape = tuple(int(v) for v in npz[f"{name}_shape"])
                    weights = sparse.csr_array(
                        (npz[f"{name}_data"], npz[f"{name}_indices"], npz[f"{name}_indptr"]),
                        shape=shape)
                    return weights, np.asarray(npz[f"{name}_bias"], dtype=np.float64)

                stages = tuple(
                    PolyStage(*matrix(f"stage{i}"), degree=int(s["degree"]),
                              label=str(s["label"]), kind=str(s["kind"]),
                              coefficients=(np.asarray(npz[f"stage{i}_coefficients"],
                                                       dtype=np.float64)
                                            if f"stage{i}_coefficients" in npz else None))
                    for i, s in enumerate(meta["stages"]))
                output = OutputStage(*matrix("output"))
                offset, scale = (np.asarray(npz[name], dtype=np.float64) if name in npz
                                 else None for name in ("input_offset", "input_scale"))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise BadInput(f"unreadable HE plan: {exc}") from exc
        plan = cls(int(meta["input_count"]), stages, output, tuple(meta["notes"]),
                   bool(meta.get("range_check", False)), offset, scale)
        plan.check()
        return plan

    def digest(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()


def encode_columns(rows: FloatArray, offset: npt.ArrayLike, scale: npt.ArrayLike
                   ) -> FloatArray:
    """The input encoding (see the module's docstring): (x - offset) * scale per column."""
    encoded: FloatArray = (rows - np.asarray(offset)) * np.asarray(scale)
    return encoded


def model_scores(scores: FloatArray, range_check: bool) -> FloatArray:
    """The model's scores among a plan's (decrypted or simulated) outputs."""
    return scores[:, :-1] if range_check else scores


def chebyshev_depth(k: int) -> int:
    """Depth of T_k from T_1 by the doubling recurrences: ceil(log2 k)."""
    return math.ceil(math.log2(k)) if k > 1 else 0


def series_depth(degree: int) -> int:
    """Levels OpenFHE's Chebyshev series evaluation of `degree` consumes."""
    for top, depth in SERIES_DEPTHS:
        if degree <= top:
            return depth
    raise ValueError(f"series degree {degree} above {SERIES_DEPTHS[-1][0]}")


def chebyshev_series(u: FloatArray, coefficients: FloatArray) -> FloatArray:
    """sum_k coefficients[i, k] T_k(u[:, i]) for every unit i (u: (n, units))."""
    values = np.polynomial.chebyshev.chebvander(u, coefficients.shape[1] - 1)
    result: FloatArray = np.einsum("nik,ik->ni", values, coefficients)
    return result


def chebyshev_split(k: int) -> tuple[int, int]:
    """T_k = 2 T_a T_b - T_(a-b) with a the largest power of two below k (b = k - a)."""
    a = 1 << (k - 1).bit_length() - 1
    return a, k - a


def chebyshev_basis(u: FloatArray, degree: int) -> FloatArray:
    """[T_1(u_i)..T_degree(u_i) for each unit i] laid out unit-major, as the evaluator does."""
    n, units = u.shape
    t = np.empty((degree + 1, n, units))
    t[0] = 1.0
    t[1] = u
    for k in range(2, degree + 1):
        a, b = chebyshev_split(k)
        t[k] = 2.0 * t[a] * t[b] - t[a - b]
    # (n, units, degree) -> unit-major columns
    return np.ascontiguousarray(np.transpose(t[1:], (1, 2, 0)).reshape(n, units * degree))


def _check_finite(weights: Weights, bias: FloatArray, what: str) -> None:
    for name, values in (("weights", np.asarray(weights.data)), ("biases", bias)):
        if not np.all(np.isfinite(values)):
            raise BadInput(f"{what} has non-finite {name} (NaN or infinity): the plan is "
                           f"refused")


def _combination_depth(weights: Weights, row: int, depths: list[int]) -> int:
    used, _values = row_terms(weights, row)
    return (max(depths[j] for j in used) if used.size else 0) + 1
