"""The CKKS engine with real OpenFHE at 128-bit: accuracy, security re-derivation, and the
byte templates that stand between untrusted bytes and OpenFHE."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from onnx import helper

from common.errors import BadInput, Refused, Unsupported
from common.he import engine, rns
from common.he.packing import SLOT_PER_SAMPLE, Packing, pack_plan
from common.he.params import CkksParams, new_key_tag
from common.he.plan import HEPlan
from common.he.template import learn_template
from common.tabular import FloatArray
from common.trust import check_security
from seller_server.compiler import compile_model
from seller_server.planner import MAX_KEY_DIGITS, choose_params, relin_key_bytes_estimate
from tests import onnx_graphs as g
from tests.he_run import encrypted_scores


@pytest.fixture(scope="module")
def tanh_model() -> tuple[bytes, FloatArray]:
    return g.mlp("Tanh"), g.calibration()


def _setup(model: bytes, rows: FloatArray) -> tuple[object, CkksParams, object]:
    compiled = compile_model(model, rows, degree=6)
    params = choose_params(engine.levels_needed(compiled.plan), 128,
                           float(np.abs(compiled.plan.simulate(rows)).max()))
    return compiled, params, engine.build_context(params, 128)


def test_encrypted_evaluation_matches_the_plan(tanh_model: tuple[bytes, FloatArray]) -> None:
    compiled, _params, cc = _setup(*tanh_model)
    rows = tanh_model[1][:100]
    tag = new_key_tag()
    secret, public = engine.generate_keys(cc, tag)
    gate = engine.CiphertextGate(cc, tag, level=0)
    # inputs travel as bytes and come back through the gate, as on the seller
    inputs = [gate.load(engine.ciphertext_bytes(engine.encrypt_vector(cc, public, column)),
                        "input") for column in compiled.plan.encoded(rows).T]  # type: ignore[attr-defined]
    progress: list[tuple[int, int]] = []
    scores = engine.evaluate(cc, compiled.plan, inputs,  # type: ignore[attr-defined]
                             lambda done, total: progress.append((done, total)))
    assert progress[-1][0] == progress[-1][1]
    decrypted = np.array([engine.decrypt_vector(cc, secret, ct, len(rows)) for ct in scores]).T
    expected = compiled.plan.simulate(rows)  # type: ignore[attr-defined]
    assert np.abs(decrypted - expected).max() < 1e-3


def test_finishing_folds_results_and_rerandomizes(
        tanh_model: tuple[bytes, FloatArray]) -> None:
    compiled, params, cc = _setup(*tanh_model)
    rows = tanh_model[1][:100]
    tag = new_key_tag()
    secret, public = engine.generate_keys(cc, tag)
    layout = Packing(SLOT_PER_SAMPLE, params.slots)
    inputs = [engine.encrypt_vector(cc, public, v)
              for v in layout.encode(compiled.plan.encoded(rows))]  # type: ignore[attr-defined]
    scores = engine.evaluate(cc, compiled.plan, inputs,  # type: ignore[attr-defined]
                             lambda done, total: None)
    noise = 1e-3
    period = layout.fold_period(len(rows), len(scores))
    assert period == 128 and layout.charged_rows(len(rows), len(scores)) == 128
    masks = layout.masks(len(rows), len(scores))
    first, second = (engine.finish(cc, scores, masks, public, noise, np.random.default_rng(s),
                                   period) for s in (1, 2))
    level = engine.result_level(compiled.plan)  # type: ignore[attr-defined]
    gate = engine.CiphertextGate(cc, tag, level)  # results keep an honest ciphertext's layout
    values = np.array([engine.open_result(cc, secret, gate.load(blob, "result"), period,
                                          len(rows)) for blob in first]).T
    expected = compiled.plan.simulate(rows)  # type: ignore[attr-defined]
    assert np.abs(values - expected).max() < 6 * noise  # flooded, within 6 sd
    assert np.abs(values - expected).std() > noise / 3  # the noise is there
    # fresh randomness each time: the same scores never leave as the same ciphertext
    assert first[0] != second[0]


@pytest.mark.parametrize("workers", [2, 3])
def test_sharded_evaluation_matches_one_process(tanh_model: tuple[bytes, FloatArray],
                                                workers: int) -> None:
    compiled, _params, cc = _setup(*tanh_model)
    rows = tanh_model[1][:50]
    tag = new_key_tag()
    secret, public = engine.generate_keys(cc, tag)
    inputs = [engine.encrypt_vector(cc, public, column)
              for column in compiled.plan.encoded(rows).T]  # type: ignore[attr-defined]
    progress: list[tuple[int, int]] = []
    scores = engine.evaluate(cc, compiled.plan, inputs,  # type: ignore[attr-defined]
                             lambda done, total: progress.append((done, total)), workers)
    decrypted = np.array([engine.decrypt_vector(cc, secret, ct, len(rows)) for ct in scores]).T
    expected = compiled.plan.simulate(rows)  # type: ignore[attr-defined]
    assert np.abs(decrypted - expected).max() < 1e-3
    assert progress and progress[-1][0] == progress[-1][1]


def test_a_narrow_column_read_by_a_large_weight_keeps_its_precision() -> None:
    """A column of spread 1e-4 read with weight 1e4 (a StandardScaler folded into a linear
    model): encrypted as is, it would carry the fresh encryption's absolute error (~1.5e-7
    at a 2^40 scale, ~2e-6 at 2^36) times 1e4 into the scores; encrypted on +-INPUT_RANGE
    (the plan's input encoding) that share is negligible."""
    rng = np.random.default_rng(3)
    rows = rng.uniform(-1.5, 1.5, (256, 6))
    rows[:, 0] *= 1e-4
    weights = np.full((6, 2), 0.5)
    weights[0] = 1e4
    model = g.build([helper.make_node("Gemm", ["x", "w", "b"], ["scores"], name="dense")],
                    6, {"scores": 2}, {"w": weights.astype(np.float32),
                                       "b": np.zeros(2, dtype=np.float32)})
    compiled = compile_model(model, rows)
    plan = compiled.plan
    params = choose_params(engine.levels_needed(plan), 128,
                           float(np.abs(plan.simulate(rows)).max()))
    assert np.abs(encrypted_scores(plan, rows, params) - plan.simulate(rows)).max() < 1e-4


def test_planner_picks_the_smallest_secure_ring() -> None:
    for depth, ring in ((1, 8192), (8, 16384), (14, 32768)):
        params = choose_params(depth, 128, 10.0)
        assert params.ring_dimension == ring
        assert engine.derive_security_bits(params) >= 128
        halved = dataclasses.replace(params, ring_dimension=ring // 2)
        assert engine.derive_security_bits(halved) == 0


def test_a_ring_near_its_limit_is_not_taken_with_huge_keys() -> None:
    """Depth 22 fits N=2^15 only with 23 key-switching digits (~300 MB per key, every
    rotation key too); N=2^16 takes 2 digits and a quarter of the bytes."""
    params = choose_params(22, 128, 10.0)
    assert params.ring_dimension == 65536
    assert params.num_large_digits <= MAX_KEY_DIGITS
    assert relin_key_bytes_estimate(params) < 100e6
    assert engine.derive_security_bits(params) >= 128


def test_security_is_rederived_not_read_from_the_claim() -> None:
    honest = choose_params(2, 128, 10.0)
    assert check_security(honest, 128) >= 128
    # a 4096 ring cannot hold this modulus at 128 bits, whatever the record claims
    weak = dataclasses.replace(honest, ring_dimension=4096, claimed_security_bits=128)
    assert engine.derive_security_bits(weak) == 0
    with pytest.raises(Refused, match=r"give no standard security.*requires 128-bit"):
        check_security(weak, 128)
    overclaimed = dataclasses.replace(honest, claimed_security_bits=256)
    with pytest.raises(Refused, match="claims 256-bit"):
        check_security(overclaimed, 128)
    unclaimed = dataclasses.replace(weak, claimed_security_bits=0)
    assert check_security(unclaimed, 0) == 0  # an explicit opt-out, for tests only


def test_malformed_parameter_records_are_refused_before_openfhe() -> None:
    honest = choose_params(2, 128, 10.0)
    for bad in (dataclasses.replace(honest, ring_dimension=12345),
                dataclasses.replace(honest, multiplicative_depth=0),
                dataclasses.replace(honest, scaling_technique="FLEXIBLEAUTO"),
                dataclasses.replace(honest, num_large_digits=99)):
        with pytest.raises(BadInput, match="unusable CKKS parameters"):
            check_security(bad, 128)


@pytest.fixture(scope="module")
def small_context() -> tuple[object, str, object, object]:
    params = choose_params(2, 128, 10.0)
    cc = engine.build_context(params, 128)
    tag = new_key_tag()
    secret, public = engine.generate_keys(cc, tag)
    return cc, tag, secret, public


def test_template_accepts_honest_and_rejects_tampered_ciphertexts(
        small_context: tuple[object, str, object, object]) -> None:
    cc, tag, secret, public = small_context
    gate = engine.CiphertextGate(cc, tag, level=0)
    values = np.arange(4, dtype=np.float64)
    honest = engine.ciphertext_bytes(engine.encrypt_vector(cc, public, values))
    ct = gate.load(honest, "honest")
    assert np.allclose(engine.decrypt_vector(cc, secret, ct, 4), np.arange(4.0), atol=1e-4)

    fixed = np.flatnonzero(gate.template.fixed)
    header_flip = bytearray(honest)
    header_flip[int(fixed[len(fixed) // 2])] ^= 0x10
    with pytest.raises(BadInput, match="outside the coefficient data differs"):
        gate.check(bytes(header_flip), "ciphertext 0")
    coefficient_flip = bytearray(honest)
    coefficient_flip[int(np.flatnonzero(~gate.template.fixed)[0])] ^= 0x01
    gate.check(bytes(coefficient_flip), "ciphertext 0")  # just another ciphertext
    with pytest.raises(BadInput, match="expected exactly"):
        gate.check(honest[:-8], "ciphertext 0")
    with pytest.raises(BadInput, match="expected exactly"):
        gate.check(honest + b"\0" * 64, "ciphertext 0")

    other_tag = engine.CiphertextGate(cc, new_key_tag(), level=0)
    with pytest.raises(BadInput, match="key tag"):
        other_tag.check(honest, "ciphertext 0")
    deeper = engine.CiphertextGate(cc, tag, level=1)
    with pytest.raises(BadInput):
        deeper.check(honest, "ciphertext 0")


def test_values_below_the_scale_resolution_encode_as_zero(
        small_context: tuple[object, str, object, object]) -> None:
    """OpenFHE refuses to encode a vector whose every coefficient is below the scale's
    resolution (a rounding-left bias of 6e-17, a buyer's near-zero row): the engine
    encodes it as zero, what those coefficients round to."""
    _cc, _tag, secret, public = small_context
    cc: Any = _cc
    slots = cc.GetRingDimension() // 2
    tiny = np.zeros(slots)
    tiny[3] = 6e-17
    with pytest.raises(RuntimeError, match="Scaling factor too small"):
        cc.MakeCKKSPackedPlaintext(tiny.tolist(), 1, 0)
    ct = engine.encrypt_vector(cc, public, tiny)
    assert np.abs(engine.decrypt_vector(cc, secret, ct, slots)).max() < 1e-4  # CKKS noise
    other = engine.encrypt_vector(cc, public, np.full(slots, 0.25))
    product = cc.Rescale(cc.EvalMult(other, engine.encode(cc, tiny, other.GetLevel())))
    assert np.abs(engine.decrypt_vector(cc, secret, product, slots)).max() < 1e-4


def test_relin_key_template(small_context: tuple[object, str, object, object]) -> None:
    cc, tag, _secret, _public = small_context
    key = engine.serialize_relin_key(tag)
    template = engine.relin_key_template(cc, tag)
    template.check(key, "relinearization key")
    engine.load_relin_key(key)
    tampered = bytearray(key)
    tampered[int(np.flatnonzero(template.fixed)[40])] ^= 0xFF
    with pytest.raises(BadInput, match="relinearization key"):
        template.check(bytes(tampered), "relinearization key")
    with pytest.raises(BadInput):
        engine.relin_key_template(cc, new_key_tag()).check(key, "relinearization key")


def test_template_finds_a_block_whose_first_byte_agreed_by_chance() -> None:
    """Three samples share a coefficient block's first (low) byte: the block still starts
    there, so an honest object that differs in that byte passes."""
    rng = np.random.default_rng(1)

    def sample(low_byte: int) -> bytes:
        words = rng.integers(0, 2**36, 64, dtype=np.uint64)  # 36-bit coefficients
        words[0] = (words[0] & ~np.uint64(0xFF)) | np.uint64(low_byte)
        return b"header:8" + words.tobytes() + b"trailer!"

    template = learn_template([sample(7) for _ in range(3)], 64 * 8)
    assert int(np.flatnonzero(~template.fixed)[0]) == 8
    template.check(sample(9), "key")
    with pytest.raises(BadInput, match="byte 4 "):
        template.check(b"headX:8" + sample(9)[7:], "key")


def test_rotation_key_template(small_context: tuple[object, str, object, object]) -> None:
    cc, tag, secret, _public = small_context
    keys = engine.generate_rotation_keys(cc, secret, [1, 4])
    template = engine.rotation_key_template(cc, tag, [1, 4])
    template.check(keys, "rotation keys")
    engine.load_rotation_keys(keys)
    with pytest.raises(BadInput, match="rotation keys: expected exactly"):
        engine.rotation_key_template(cc, tag, [1, 2, 4]).check(keys, "rotation keys")


def _encrypted_error(model: bytes, rows: FloatArray) -> float:
    """max |decrypted encrypted evaluation - the plan in plaintext| on `rows`."""
    compiled = compile_model(model, rows, degree=6)
    params = choose_params(engine.levels_needed(compiled.plan), 128,
                           float(np.abs(compiled.plan.simulate(rows)).max()))
    decrypted = encrypted_scores(compiled.plan, rows, params)
    return float(np.abs(decrypted - compiled.plan.simulate(rows)).max())


@pytest.mark.parametrize("workers", [1, 2])
def test_squares_read_by_few_rows_are_relinearized_once_per_row(workers: int) -> None:
    """An MLP whose 40 squares feed 3 outputs: the squares stay 3-element ciphertexts and
    each output is relinearized once (also across processes exchanging partial sums);
    the scores are unchanged."""
    rows = g.calibration()[:64]
    compiled, _params, cc = _setup(g.mlp("square", hidden=40), rows)
    plan = compiled.plan  # type: ignore[attr-defined]
    assert engine.lazy_entries(plan) == frozenset(range(6, 46))
    narrow = _setup(g.mlp("square", hidden=4, classes=6), rows)[0].plan  # type: ignore[attr-defined]
    assert not engine.lazy_entries(narrow)  # 6 relinearizations would replace 4
    secret, public = engine.generate_keys(cc, new_key_tag())
    inputs = [engine.encrypt_vector(cc, public, column) for column in plan.encoded(rows).T]
    scores = engine.evaluate(cc, plan, inputs, lambda done, total: None, workers)
    decrypted = np.array([engine.decrypt_vector(cc, secret, ct, len(rows)) for ct in scores]).T
    assert np.abs(decrypted - plan.simulate(rows)).max() < 1e-3


def test_residual_sum_mixes_levels_correctly() -> None:
    from tests.test_compiler import _branches

    assert _encrypted_error(_branches(), g.calibration(5)[:64]) < 1e-3


@pytest.mark.parametrize("merge", g.MERGES)
def test_bident_merges_evaluate_encrypted(merge: str) -> None:
    """The whole bident graph (both branches and the merge) under real encryption."""
    assert _encrypted_error(g.bident(merge, "square"), g.calibration()[:64]) < 1e-3


@pytest.mark.parametrize(("model", "degree", "folded"), [
    ("tanh-mlp", 6, True), ("tanh-mlp", 7, False), ("max-bident", 6, True),
    ("relu-mlp", 48, False)])
def test_feature_packed_evaluation_matches_the_plan(model: str, degree: int,
                                                    folded: bool) -> None:
    """All features of a row in one ciphertext, `stride` rows strided in it; baby-step/
    giant-step diagonal products with hoisted rotations: the same scores as the
    slot-per-sample plan, for full and partly filled ciphertexts. A tanh of degree 6 is
    folded into one block (T_1..T_4 and T_4 * (T_1, T_2): no extra level); degree 7
    would need one, so it stays 7 blocks; the bident's Max is a folded |a - b|; a relu
    of degree 48 is one Chebyshev series for all units, one OpenFHE series call (at the
    units' largest scale: evaluated at scale 1, its CKKS error times each unit's scale
    misses the bound, 1.2e-3)."""
    onnx_model = {"tanh-mlp": g.mlp("Tanh"), "relu-mlp": g.mlp("Relu")}.get(
        model) or g.bident("max", "square")
    rows = g.calibration()
    compiled = compile_model(onnx_model, rows, degree=degree)
    params = choose_params(engine.levels_needed(compiled.plan), 128,
                           float(np.abs(compiled.plan.simulate(rows)).max()))
    cc = engine.build_context(params, 128)
    packed = pack_plan(compiled.plan)
    assert any(s.fold is not None for s in packed.stages) == folded
    assert any(s.coefficients is not None for s in packed.stages) == (model == "relu-mlp")
    expected = compiled.plan.simulate(rows)
    encoded = compiled.plan.encoded(rows)  # as the buyer encrypts them
    for row, want in zip(encoded[:3], expected[:3], strict=True):
        assert np.abs(packed.simulate(row) - want).max() < 1e-9  # the diagonals, in numpy
    slots = cc.GetRingDimension() // 2
    layout = packed.layout(slots)
    secret, public = engine.generate_keys(cc, new_key_tag())
    indices = packed.rotation_indices(slots)
    assert indices == [k * layout.rows_per_ciphertext for k in (1, 2, 3, 4)]
    assert len(engine.generate_rotation_keys(cc, secret, indices)) > 0
    evaluator = engine.PackedEvaluator(cc, packed)
    for count in (min(layout.rows_per_ciphertext, len(rows)), 3):
        [vector] = layout.encode(encoded[:count])
        assert np.array_equal(layout.decode([vector], count, packed.features), encoded[:count])
        sample = cc.Encrypt(public, cc.MakeCKKSPackedPlaintext(vector.tolist()))
        scores = engine.decrypt_vector(cc, secret, evaluator.evaluate(sample), slots)
        got = layout.decode([np.array(scores)], count, packed.scores)
        assert np.abs(got - expected[:count]).max() < 1e-3


@pytest.mark.parametrize(("degree", "security_bits"), [(48, 128), (128, 0)])
def test_high_degree_activations_are_openfhe_series_at_the_planned_depth(
        degree: int, security_bits: int) -> None:
    """Above degree 32 an activation adds one Paterson-Stockmeyer series entry per unit:
    OpenFHE evaluates it within the levels the plan counts (`settle` refuses a result
    above the plan's depth) and to the plan's values; the plan keeps its coefficients
    through storage; feature packing refuses a tanh series, whose units each have their
    own polynomial, by name. Degree 128 runs on a small insecure ring (security 0): it
    checks the depth table, not security."""
    rows = g.calibration()[:64]
    compiled = compile_model(g.mlp("Relu"), rows, degree=degree)
    (stage,) = compiled.plan.stages
    assert stage.kind == "series" and stage.width == 1
    stored = HEPlan.from_bytes(compiled.plan.to_bytes())
    assert np.array_equal(stored.simulate(rows), compiled.plan.simulate(rows))
    with pytest.raises(Unsupported, match="feature packing does not evaluate a Chebyshev "
                       "series whose units each have their own polynomial"):
        pack_plan(compile_model(g.mlp("Tanh"), rows, degree=degree).plan)
    params = choose_params(engine.levels_needed(compiled.plan), security_bits,
                           compiled.value_bound, insecure_ring=0 if security_bits else 4096)
    decrypted = encrypted_scores(compiled.plan, rows, params, security_bits)
    assert np.abs(decrypted - compiled.plan.simulate(rows)).max() < 1e-3


@pytest.mark.parametrize("workers", [1, 2])
def test_dense_sums_are_the_bytes_openfhe_computes_term_by_term(
        monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    """Dense rows go through one exact matrix product on the ciphertexts' RNS coefficients
    (common.he.rns); every score must be byte for byte what EvalLinearWSum gives, for sums
    over fresh inputs and over unrelinearized squares (3 elements) two levels down."""
    rows = g.calibration()[:64]
    compiled, _params, cc = _setup(g.mlp("square", hidden=40), rows)
    plan = compiled.plan  # type: ignore[attr-defined]
    secret, public = engine.generate_keys(cc, new_key_tag())
    inputs = [engine.encrypt_vector(cc, public, column) for column in plan.encoded(rows).T]
    calls: list[int] = []
    real_combine = rns.combine

    def counting(*args: Any) -> None:
        calls.append(len(args[2]))  # rows summed
        real_combine(*args)

    monkeypatch.setattr(rns, "combine", counting)

    monkeypatch.setattr(engine, "DENSE_MIN_ROWS", 1)

    def run(min_terms: int) -> list[Any]:
        monkeypatch.setattr(engine, "DENSE_MIN_TERMS", min_terms)
        assert engine.lazy_entries(plan) == frozenset(range(6, 46))
        return engine.evaluate(cc, plan, inputs, lambda done, total: None, workers)

    term_by_term = run(10**9)
    assert not calls
    dense = run(1)
    # (canonical bytes: an object's serialized layout depends on what it shares in memory)
    assert [engine.ciphertext_bytes(ct) for ct in dense] == [engine.ciphertext_bytes(ct)
                                                             for ct in term_by_term]
    if workers == 1:  # forked workers count in their own memory
        assert calls == [40, 3]  # the hidden layer, then the output layer
    decrypted = np.array([engine.decrypt_vector(cc, secret, ct, len(rows)) for ct in dense]).T
    assert np.abs(decrypted - plan.simulate(rows)).max() < 1e-3


def test_max_pool_evaluates_encrypted() -> None:
    """MaxPool's rounds of |a - b| (two for 2x2 windows) after a ReLU moved past it."""
    model = g.max_pool_cnn({"kernel_shape": [2, 2], "strides": [2, 2]}, side=4, maps=1)
    assert _encrypted_error(model, g.calibration(16)[:64]) < 1e-3
