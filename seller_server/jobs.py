"""What the gateway asks of its evaluator workers: one frozen dataclass per trial job.

This is where untrusted bytes cross into the sandbox. A job names files, never carries
bytes; every uploaded file lives at a path derived from the SHA-256 of what was uploaded
(`KeySet.directory`), so the bytes a worker checks, the digest the store records and the
bytes a later evaluation opens are the same bytes: two uploads to one trial at once write
two directories, and one that fails its check is deleted before anything can refer to it.
Jobs cross the process boundary as JSON (common.guarded); `to_json` and `job_from_json`
are the only conversions, checked by mypy on both sides. The catalog's jobs are here too:
`CompileListing` (one listing, in a worker of its own, under the listing's time limit) and
the self-tests it runs in workers of their own (`SelfTest`, `SelfTestPacked`), each with its
result type (`SlotsMeasured`, `PackedMeasured`, `CompiledListing`).
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

from common.guarded import Json, Limits, ProgressFn, run_guarded
from common.he.packing import FEATURE_PACKED, Packing
from common.he.params import CkksParams

# The key objects a trial uploads, in upload order, with what an error calls them.
KEY_OBJECTS = {"relin_key": "relinearization key", "public_key": "public key",
               "rotation_keys": "rotation keys"}


def key_names(packing: Packing) -> tuple[str, ...]:
    """The key objects a trial in `packing` uploads (rotation keys only feature-packed)."""
    names = ("relin_key", "public_key")
    return (*names, "rotation_keys") if packing.kind == FEATURE_PACKED else names


@dataclass(frozen=True)
class TrialSetup:
    """What every job of a trial is told: the seller's parameters and plan, the packing."""

    params: CkksParams
    security_bits: int
    plan_path: str
    key_tag: str
    packing: Packing
    rotation_indices: tuple[int, ...]


@dataclass(frozen=True)
class KeySet:
    """One upload of a trial's keys: a directory named by the SHA-256 of the whole set
    (common.signing.keys_digest), one file per key object."""

    directory: str
    sha256: str  # hex
    names: tuple[str, ...]

    def path(self, name: str) -> Path:
        return Path(self.directory) / f"{name}.bin"


@dataclass(frozen=True)
class CheckKeys:
    """Template-check an uploaded key set (bytes only, nothing deserialized)."""

    setup: TrialSetup
    keys: KeySet
    public_key_seed: str  # hex; the public key's uniform half must be derived from it

    TARGET = "seller_server.worker:check_keys"


@dataclass(frozen=True)
class EvaluateBatch:
    """Check, open and evaluate one batch of uploaded ciphertexts under a checked key set;
    finish the results and write them to `out_dir`."""

    setup: TrialSetup
    keys: KeySet
    rows: int
    circuit_privacy: bool
    flooding_std: float
    policy_noise_std: float
    ciphertext_paths: tuple[str, ...]
    out_dir: str
    workers: int

    TARGET = "seller_server.worker:evaluate_batch"


@dataclass(frozen=True)
class SelfTest:
    """Encrypt calibration rows with throwaway keys, evaluate the plan slot-per-sample,
    finish as a trial would and decrypt; the finished results go to `out_path` (.npy)."""

    params: CkksParams
    security_bits: int
    plan_path: str
    rows_path: str  # .npz with the rows as "rows"
    out_path: str
    workers: int
    circuit_privacy: bool
    flooding_bits: int  # the flooding noise is 2^bits x the measured CKKS error
    policy_noise_std: float

    TARGET = "seller_server.worker:self_test"


@dataclass(frozen=True)
class SlotsMeasured:
    """What `SelfTest` measured: the exact size of every object a trial moves, times,
    errors."""

    ciphertext_bytes: int
    relin_key_bytes: int
    public_key_bytes: int
    result_bytes: int
    evaluate_seconds: float
    key_check_seconds: float  # per trial: byte templates of the relinearization + public key
    encrypt_seconds: float  # one input ciphertext, on one core (the buyer's side)
    computation_error: float  # max |decrypted - plan| before finishing
    flooding_std: float


@dataclass(frozen=True)
class SelfTestPacked:
    """The same for feature packing, in a process of its own (a CryptoNets-sized model
    needs GBs for each packing)."""

    params: CkksParams
    security_bits: int
    plan_path: str
    rows_path: str
    out_path: str
    workers: int
    flooding_std: float  # the one the slot-per-sample self-test sized
    policy_noise_std: float

    TARGET = "seller_server.worker:self_test_packed"


@dataclass(frozen=True)
class PackedMeasured:
    """What `SelfTestPacked` measured; packed_period 0: feature packing is not offered."""

    packed_period: int = 0
    packed_rotation_key_bytes: int = 0
    packed_rotation_keys: int = 0
    packed_setup_seconds: float = 0.0  # per trial: generating + checking the rotation keys
    packed_evaluate_seconds: float = 0.0  # one ciphertext, every worker busy


@dataclass(frozen=True)
class Measured(SlotsMeasured):
    """What the encrypted self-tests measured at listing time (feature packing: see
    PackedMeasured)."""

    he_error: float  # max |tail(finished result) - onnxruntime| on the compared output
    packed_period: int = 0
    packed_rotation_key_bytes: int = 0
    packed_rotation_keys: int = 0
    packed_setup_seconds: float = 0.0
    packed_evaluate_seconds: float = 0.0

    @classmethod
    def of(cls, slots: SlotsMeasured, packed: PackedMeasured, he_error: float) -> Measured:
        return cls(**dataclasses.asdict(slots), **dataclasses.asdict(packed),
                   he_error=he_error)


@dataclass(frozen=True)
class CompileListing:
    """Read one listing and its files, compile its model to an HE plan, self-test it
    (each packing in a `SelfTest*` worker of its own, under `limits`) and size its
    fingerprint: everything that opens the seller's model (onnx, onnxruntime, OpenFHE)
    happens in this job's worker, so a model that crashes or outgrows it costs only its
    own listing. `cache_key` is what the gateway computed from the files; the worker
    computes it again from the bytes it read, so what it compiled is what is served."""

    listing_path: str
    cache_key: str
    security_bits: int
    insecure_ring: int
    limits: Limits  # of each self-test worker
    workers: int  # processes one self-test evaluation is split over

    TARGET = "seller_server.catalog:compile_listing"


@dataclass(frozen=True)
class CompiledListing:
    """What `CompileListing` returns and the state database caches under its key."""

    plan: str  # base64 of HEPlan.to_bytes()
    tail_ops: tuple[str, ...]
    class_labels: tuple[str, ...]
    probability_output: str
    label_output: str
    params: CkksParams
    tolerance: float
    plan_tolerance: float  # max |decrypted result - plan(rows)| an offer guarantees
    approximation: str
    measured: Measured
    fingerprint_strength: float  # 0: copies are not fingerprinted
    fingerprint_note: str  # the strength chosen and what it costs, or why there is none
    warnings: tuple[str, ...] = ()  # for the seller's log (e.g. feature packing withdrawn)


Job = CheckKeys | EvaluateBatch | SelfTest | SelfTestPacked | CompileListing
Result = SlotsMeasured | PackedMeasured | CompiledListing
T = TypeVar("T")


def run(job: Job, *, limits: Limits, on_progress: ProgressFn | None = None,
        untrusted_stages: frozenset[str] = frozenset(),
        cancel: threading.Event | None = None) -> Json:
    """`job` in a throwaway worker process (common.guarded.run_guarded). A CompileListing's
    time limit counts from its first progress report (its worker's imports excluded: many
    compile workers start at once when serve starts)."""
    return run_guarded(job.TARGET, to_json(job), limits=limits, on_progress=on_progress,
                       untrusted_phase=lambda p: p.get("stage") in untrusted_stages,
                       cancel=cancel,
                       clock_from_first_progress=isinstance(job, CompileListing))


def to_json(job: Job | Result) -> Json:
    return dataclasses.asdict(job)


def job_from_json(cls: type[T], data: Json) -> T:
    """The dataclass `cls` rebuilt from `to_json`'s form (nested dataclasses, tuples)."""
    return _value(cls, data)  # type: ignore[no-any-return]


def _value(kind: Any, data: Any) -> Any:
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        hints = get_type_hints(kind)
        factory: Any = kind
        return factory(**{f.name: _value(hints[f.name], data[f.name])
                          for f in dataclasses.fields(kind)})
    if get_origin(kind) is tuple:
        item = get_args(kind)[0]
        return tuple(_value(item, value) for value in data)
    return data
