"""Feature-packed layout of an HE plan: one row per ciphertext, its features in the slots.

The slot-per-sample plan (common.he.plan) has one ciphertext per basis entry and packs many
rows into each; here one ciphertext holds a whole vector of one row, repeated with period
`d` (a power of two >= every layer width) so that rotations wrap inside each period.
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

from common.he.plan import FloatArray, HEPlan, chebyshev_basis


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
    kind: str  # "chebyshev" or "square"
    degree: int


@dataclass(frozen=True)
class PackedPlan:
    d: int  # period of every slot vector
    baby: int  # b1
    features: int
    stages: tuple[PackedStage, ...]
    output: PackedLinear
    scores: int

    def rotation_indices(self) -> list[int]:
        """Rotation keys the evaluation needs (the buyer generates and uploads them)."""
        babies = set(range(1, self.baby))
        giants = {g * self.baby for s in (*self.stages, None)
                  for g in (s.linear if s else self.output).giant_steps() if g}
        return sorted(babies | giants)

    def rotations(self) -> int:
        """Key switches per evaluation: hoisted baby steps per block + giant steps."""
        total = 0
        for linear in (*(s.linear for s in self.stages), self.output):
            total += len(linear.blocks) * (self.baby - 1) + len(
                [g for g in linear.giant_steps() if g])
        return total

    def plaintext_products(self) -> int:
        return sum(s.linear.products() for s in self.stages) + self.output.products()

    def encode(self, row: FloatArray, slots: int) -> FloatArray:
        """A row's features as the input slot vector (period d, filling `slots`)."""
        vector = np.zeros(self.d)
        vector[:self.features] = row
        return np.tile(vector, slots // self.d)

    def simulate(self, row: FloatArray) -> FloatArray:
        """The packed evaluation in numpy (np.roll for rotations): must equal the plan's."""
        blocks = {0: np.pad(np.asarray(row, dtype=np.float64), (0, self.d - self.features))}
        for stage in self.stages:
            u = self._apply(stage.linear, blocks)
            entries = (np.square(u)[None] if stage.kind == "square" else
                       chebyshev_basis(u[None], stage.degree).reshape(self.d, stage.degree).T)
            for values in entries:
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
    widths = [plan.input_count, plan.score_count, *(s.units for s in plan.stages)]
    d = 1 << max(w - 1 for w in widths).bit_length()
    baby = 1 << math.ceil(math.log2(d) / 2)
    layout: list[tuple[int, int]] = [(0, i) for i in range(plan.input_count)]  # entry: block, slot
    stages = []
    for stage in plan.stages:
        stages.append(PackedStage(_linear(stage.weights, stage.bias, layout, d, baby),
                                  stage.kind, stage.degree))
        first = 1 + max(block for block, _slot in layout)
        layout += [(first + k, unit) for unit in range(stage.units)
                   for k in range(stage.width)]  # unit-major, as the plan lays entries out
    output = _linear(plan.output.weights, plan.output.bias, layout, d, baby)
    return PackedPlan(d, baby, plan.input_count, tuple(stages), output, plan.score_count)


def _linear(weights: object, bias: FloatArray, layout: list[tuple[int, int]], d: int,
            baby: int) -> PackedLinear:
    dense = np.asarray(weights.toarray())  # type: ignore[attr-defined]
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
