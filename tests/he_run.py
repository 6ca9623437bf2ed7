"""A plan under real OpenFHE, as a trial runs it: the buyer encrypts its encoded rows, the
seller evaluates slot-per-sample, the buyer decrypts the scores."""

from __future__ import annotations

import numpy as np

from common.he import engine
from common.he.params import CkksParams, new_key_tag
from common.he.plan import HEPlan
from common.tabular import FloatArray


def encrypted_scores(plan: HEPlan, rows: FloatArray, params: CkksParams,
                     security_bits: int = 128) -> FloatArray:
    """The decrypted scores (rows, scores) of `plan` on `rows` under `params`."""
    cc = engine.build_context(params, security_bits)
    secret, public = engine.generate_keys(cc, new_key_tag())
    inputs = [engine.encrypt_vector(cc, public, column) for column in plan.encoded(rows).T]
    scores = engine.evaluate(cc, plan, inputs, lambda done, total: None)
    decrypted: FloatArray = np.array(
        [engine.decrypt_vector(cc, secret, ct, len(rows)) for ct in scores]).T
    return decrypted
