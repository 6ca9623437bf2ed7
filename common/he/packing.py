"""Feature-packed layout of an HE plan: all features of a row in one ciphertext.

The slot-per-sample plan (common.he.plan) has one ciphertext per basis entry and packs many
rows into each; here one ciphertext holds whole vectors of `stride` rows. Each vector is
padded to `d` entries (a power of two >= every layer width) and laid out strided: entry j
of row r sits in slot j*stride + r. Rotating the ciphertext by k*stride then rotates every
row's vector by k cyclically at once (the wrap-around of the slot vector is exactly the
wrap-around inside each row), so the one-row algorithm below serves `stride` rows.
Basis entries become *blocks*: the input is block 0, and each stage adds one block per
entry kind (T_1(u)..T_D(u) over all its units, or u*u), the unit's entry in slot `unit`.

A stage's `u = W @ basis + b` is, per block, a matrix-vector product by the diagonal
method with baby-step/giant-step rotations (Halevi-Shoup): with i = g*b1 + b,

    W x = sum_g rot( sum_b rot(diag_{g*b1+b}, -g*b1) * rot(x, b), g*b1 )

so a block needs only its b1 - 1 baby rotations (hoisted: they share one key-switching
decomposition) and a stage needs one giant rotation per g for all its blocks together.
Everything here is numpy: the engine executes it, and `simulate` checks the layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.errors import Unsupported
from common.he.plan import FloatArray, HEPlan, chebyshev_basis, chebyshev_series

SLOT_PER_SAMPLE = "slot-per-sample"
FEATURE_PACKED = "feature-packed"
PACKINGS = (SLOT_PER_SAMPLE, FEATURE_PACKED)


def _power_of_two(value: int) -> int:
    return 1 << max(value - 1, 0).bit_length()


@dataclass(frozen=True)
class Packing:
    """Where a batch's rows and scores sit in its ciphertexts: all that the buyer and an
    arbiter need to know of the packing (the weights stay with the seller).

    slot-per-sample: ciphertext j holds column j of every row (row r in slot r).
    feature-packed: ciphertext i holds rows i*stride.. of the batch, entry j of row r in
    slot j*stride + r, entries padded to `period`.
    """

    kind: str
    rows_per_ciphertext: int  # slots, or the stride
    period: int = 1

    @property
    def slots(self) -> int:
        return self.rows_per_ciphertext * self.period

    def ciphertexts(self, rows: int, width: int) -> int:
        """How many ciphertexts `rows` rows of `width` entries take."""
        if self.kind == SLOT_PER_SAMPLE:
            return width
        return -(-rows // self.rows_per_ciphertext)

    def result_count(self, rows: int, scores: int) -> int:
        """How many result ciphertexts a batch of `rows` rows gets back."""
        return scores if self.kind == SLOT_PER_SAMPLE else self.ciphertexts(rows, scores)

    def to_dict(self) -> dict[str, int | str]:
        return {"kind": self.kind, "rows_per_ciphertext": self.rows_per_ciphertext,
                "period": self.period}

    def encode(self, rows: FloatArray) -> list[FloatArray]:
        """A batch (at most `slots` rows) as slot vectors. Unused positions repeat real
        rows: a zero row can fall outside an activation's approximation range.
        Slot-per-sample repeats the batch with the fold's period, so that every slot a
        result is folded over holds the same row (`fold_period`)."""
        rows = np.asarray(rows, dtype=np.float64)
        if self.kind == SLOT_PER_SAMPLE:
            period = self.fold_period(len(rows), 1)
            return [np.resize(np.resize(column, period), self.slots) for column in rows.T]
        stride = self.rows_per_ciphertext
        vectors: list[FloatArray] = []
        for start in range(0, len(rows), stride):
            matrix = np.zeros((self.period, stride))
            matrix[:rows.shape[1]] = np.resize(rows[start:start + stride],
                                               (stride, rows.shape[1])).T
            vectors.append(matrix.reshape(-1))
        return vectors

    def decode(self, vectors: list[FloatArray], rows: int, count: int) -> FloatArray:
        """The first `count` entries of the batch's `rows` rows, shape (rows, count)."""
        if self.kind == SLOT_PER_SAMPLE:
            return np.array([v[:rows] for v in vectors], dtype=np.float64).T.reshape(rows, count)
        parts = [np.asarray(v, dtype=np.float64).reshape(self.period, self.rows_per_ciphertext)
                 [:count, :self._rows_in(i, rows)].T for i, v in enumerate(vectors)]
        return np.concatenate(parts).reshape(rows, count)

    def fold_period(self, rows: int, count: int) -> int:
        """The period, in slots, every result of a batch of `rows` rows and `count` scores
        is folded with (seller_server.worker: what leaves the seller is one real number
        per class of slots equal modulo it): slot-per-sample, the rows rounded up to a
        power of two; feature-packed, the score blocks rounded up to a power of two, so
        that no two scores of the batch share a class."""
        if self.kind == SLOT_PER_SAMPLE:
            return min(_power_of_two(rows), self.slots)
        return min(_power_of_two(count) * self.rows_per_ciphertext, self.slots)

    def charged_rows(self, rows: int, count: int) -> int:
        """The rows a batch pays for: every class of slots a result returns is one real
        number the buyer reads, so the batch is charged for all of them (a buyer cannot
        be stopped from filling slots it did not declare, only from reading them)."""
        if self.kind == SLOT_PER_SAMPLE:
            return self.fold_period(rows, count)
        return self.ciphertexts(rows, count) * -(-self.fold_period(rows, count) // count)

    def masks(self, rows: int, count: int) -> list[FloatArray]:
        """Per result ciphertext, the plaintext it is multiplied by before the fold.
        Slot-per-sample: the constant 1/copies (a constant encodes exactly), as the fold
        adds up `slots / period` copies of each row. Feature-packed: 1 where `decode`
        reads and 0 elsewhere, so an honest result's class holds only its score."""
        if self.kind == SLOT_PER_SAMPLE:
            copies = self.slots // self.fold_period(rows, count)
            return [np.full(self.slots, 1.0 / copies)] * count
        masks: list[FloatArray] = []
        for i in range(self.ciphertexts(rows, count)):
            matrix = np.zeros((self.period, self.rows_per_ciphertext))
            matrix[:count, :self._rows_in(i, rows)] = 1.0
            masks.append(matrix.reshape(-1))
        return masks

    def spread(self, values: FloatArray) -> FloatArray:
        """A per-entry vector (length `period`) for every row: a plaintext operand."""
        return np.repeat(np.asarray(values, dtype=np.float64), self.rows_per_ciphertext)

    def _rows_in(self, index: int, rows: int) -> int:
        return min(self.rows_per_ciphertext, rows - index * self.rows_per_ciphertext)


@dataclass(frozen=True)
class PackedLinear:
    """u = sum over blocks of (diagonal products) + bias, as slot vectors of length d."""

    # block -> {giant step g: {baby step b: diagonal pre-rotated by -g*b1 (length d)}}
    terms: dict[int, dict[int, dict[int, FloatArray]]]
    bias: FloatArray  # (d,)

    @property
    def blocks(self) -> list[int]:
        return sorted(self.terms)

    def giant_steps(self) -> list[int]:
        return sorted({g for steps in self.terms.values() for g in steps})

    def products(self) -> int:
        return sum(len(babies) for steps in self.terms.values() for babies in steps.values())


@dataclass(frozen=True)
class PackedStage:
    linear: PackedLinear
    kind: str  # "chebyshev", "series" or "square"
    degree: int
    # chebyshev, folded: the stage adds one block, sum_k fold[k-1] * T_k(u), instead of
    # one block per T_k (see `_foldable`); fold[k-1][i] is unit i's coefficient of T_k
    fold: FloatArray | None = None
    # series: the one polynomial all its units share, as a (1, degree + 1) row of
    # Chebyshev coefficients; the stage adds one block, p(u)
    coefficients: FloatArray | None = None

    def entries(self, u: FloatArray) -> list[FloatArray]:
        """The blocks the stage adds, in numpy."""
        if self.kind == "square":
            return [np.square(u)]
        if self.coefficients is not None:
            return [chebyshev_series(u[:, None], self.coefficients)[:, 0]]
        powers = chebyshev_basis(u[None], self.degree).reshape(len(u), self.degree).T
        if self.fold is not None:
            return [np.sum(self.fold * powers, axis=0)]
        return list(powers)


@dataclass(frozen=True)
class PackedPlan:
    d: int  # period of every slot vector
    baby: int  # b1
    depth: int  # levels the evaluation consumes (the slot-per-sample plan's depth)
    features: int
    stages: tuple[PackedStage, ...]
    output: PackedLinear
    scores: int

    def rotation_indices(self, slots: int) -> list[int]:
        """Slot rotations the evaluation uses: the rotation keys the buyer generates and
        uploads (a row's vector rotates by k when the ciphertext rotates by k*stride)."""
        babies = set(range(1, self.baby))
        giants = {g * self.baby for s in (*self.stages, None)
                  for g in (s.linear if s else self.output).giant_steps() if g}
        stride = self.layout(slots).rows_per_ciphertext
        return [k * stride for k in sorted(babies | giants)]

    def layout(self, slots: int) -> Packing:
        return Packing(FEATURE_PACKED, slots // self.d, self.d)

    def rotations(self) -> int:
        """Key switches per evaluation: hoisted baby steps per block + giant steps."""
        total = 0
        for linear in (*(s.linear for s in self.stages), self.output):
            total += len(linear.blocks) * (self.baby - 1) + len(
                [g for g in linear.giant_steps() if g])
        return total

    def plaintext_products(self) -> int:
        return sum(s.linear.products() for s in self.stages) + self.output.products()

    def simulate(self, row: FloatArray) -> FloatArray:
        """The packed evaluation in numpy (np.roll for rotations): must equal the plan's."""
        blocks = {0: np.pad(np.asarray(row, dtype=np.float64), (0, self.d - self.features))}
        for stage in self.stages:
            for values in stage.entries(self._apply(stage.linear, blocks)):
                blocks[len(blocks)] = values
        return self._apply(self.output, blocks)[:self.scores]

    def _apply(self, linear: PackedLinear, blocks: dict[int, FloatArray]) -> FloatArray:
        total = linear.bias.copy()
        for g in linear.giant_steps():
            inner = np.zeros(self.d)
            for block, steps in linear.terms.items():
                for b, diagonal in steps.get(g, {}).items():
                    inner += diagonal * np.roll(blocks[block], -b)
            total += np.roll(inner, -g * self.baby)
        return total


def pack_plan(plan: HEPlan) -> PackedPlan:
    for stage in plan.stages:
        if stage.coefficients is not None and np.any(
                stage.coefficients != stage.coefficients[:1]):
            raise Unsupported("feature packing does not evaluate a Chebyshev series whose "
                              "units each have their own polynomial (tanh or sigmoid above "
                              "degree 32); the model is offered slot-per-sample")
    widths = [plan.input_count, plan.score_count, *(s.units for s in plan.stages)]
    d = 1 << max(w - 1 for w in widths).bit_length()
    baby = 1 << math.ceil(math.log2(d) / 2)
    readers = [np.asarray(w.toarray())
               for w in (*(s.weights for s in plan.stages), plan.output.weights)]
    # the packed basis: each entry is (block, slot) and a combination of plan entries
    layout: list[tuple[int, int]] = [(0, i) for i in range(plan.input_count)]
    combos: list[tuple[list[int], FloatArray]] = [([i], np.ones(1))
                                                   for i in range(plan.input_count)]
    stages = []
    offset = plan.input_count
    for index, stage in enumerate(plan.stages):
        linear = _linear(_combined(readers[index], combos), stage.bias, layout, d, baby)
        first = 1 + max(block for block, _slot in layout)
        entries = [list(range(offset + unit * stage.width, offset + (unit + 1) * stage.width))
                   for unit in range(stage.units)]
        coefficients = (_foldable(stage.degree, [r[:, offset:] for r in readers[index + 1:]],
                                  stage.units) if stage.kind == "chebyshev" else None)
        shared = stage.coefficients[:1].copy() if stage.coefficients is not None else None
        if shared is not None or coefficients is None:
            layout += [(first + k, unit) for unit in range(stage.units)
                       for k in range(stage.width)]  # unit-major, as the plan lays entries out
            combos += [([column], np.ones(1)) for columns in entries for column in columns]
            fold = None
        else:
            layout += [(first, unit) for unit in range(stage.units)]
            combos += list(zip(entries, coefficients, strict=True))
            fold = np.zeros((stage.degree, d))
            fold[:, :stage.units] = coefficients.T
        stages.append(PackedStage(linear, stage.kind, stage.degree, fold, shared))
        offset += stage.units * stage.width
    output = _linear(_combined(readers[-1], combos), plan.output.bias, layout, d, baby)
    return PackedPlan(d, baby, plan.depth(), plan.input_count, tuple(stages), output,
                      plan.score_count)


def _combined(weights: FloatArray, combos: list[tuple[list[int], FloatArray]]) -> FloatArray:
    """A plan layer's weights over the packed basis (the entries it can read)."""
    usable = [(columns, c) for columns, c in combos if columns[-1] < weights.shape[1]]
    return np.stack([weights[:, columns] @ c for columns, c in usable], axis=1)


def _foldable(degree: int, readers: list[FloatArray], units: int) -> FloatArray | None:
    """Per unit, the unit-norm coefficients c (over T_1..T_degree) with which every later
    layer reads the unit's entries, when each reads them as w * (c . T(u)) (an activation
    polynomial followed by a linear layer does); None when some unit is read otherwise or
    folding would need a level more. Then c . T(u) is one block, and the next layer reads
    one block instead of `degree`, each with its own rotations.

    Depth: with L = ceil(log2 degree) (the level of T_degree) and H = 2^(L-1),
    sum c_k T_k = sum_{j<=H} (c_j - c_{2H-j}) T_j + 2 T_H (sum_{j<=degree-H} c_{H+j} T_j)
    stays at level L when degree - H <= H/2 (engine.PackedEvaluator._fold)."""
    if degree < 3:
        return None
    half = 1 << (degree - 1).bit_length() - 1
    if degree - half > half // 2:
        return None
    coefficients = np.zeros((units, degree))
    for unit in range(units):
        columns = slice(unit * degree, (unit + 1) * degree)
        read = np.concatenate([r[:, columns] for r in readers])
        if not np.any(read):
            coefficients[unit, 0] = 1.0
            continue
        _u, singular, vt = np.linalg.svd(read, full_matrices=False)
        if singular.size > 1 and singular[1] > 1e-9 * singular[0]:
            return None
        coefficients[unit] = vt[0]
    return coefficients


def _linear(dense: FloatArray, bias: FloatArray, layout: list[tuple[int, int]], d: int,
            baby: int) -> PackedLinear:
    per_block: dict[int, FloatArray] = {}
    for column in np.flatnonzero(np.any(dense != 0, axis=0)):
        block, slot = layout[column]
        matrix = per_block.setdefault(block, np.zeros((d, d)))
        matrix[:dense.shape[0], slot] = dense[:, column]
    terms: dict[int, dict[int, dict[int, FloatArray]]] = {}
    rows = np.arange(d)
    for block, matrix in per_block.items():
        for i in range(d):
            diagonal = matrix[rows, (rows + i) % d]
            if not np.any(diagonal):
                continue
            g, b = divmod(i, baby)
            terms.setdefault(block, {}).setdefault(g, {})[b] = np.roll(diagonal, g * baby)
    padded = np.zeros(d)
    padded[:len(bias)] = bias
    return PackedLinear(terms, padded)
