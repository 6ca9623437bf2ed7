"""What the gateway asks of its evaluator workers: one frozen dataclass per trial job.

This is where untrusted bytes cross into the sandbox. A job names files, never carries
bytes; every uploaded file lives at a path derived from the SHA-256 of what was uploaded
(`KeySet.directory`), so the bytes a worker checks, the digest the store records and the
bytes a later evaluation opens are the same bytes: two uploads to one trial at once write
two directories, and one that fails its check is deleted before anything can refer to it.
Jobs cross the process boundary as JSON (common.guarded); `to_json` and `job_from_json`
are the only conversions, checked by mypy on both sides.
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


Job = CheckKeys | EvaluateBatch
T = TypeVar("T")


def run(job: Job, *, limits: Limits, on_progress: ProgressFn | None = None,
        untrusted_stages: frozenset[str] = frozenset(),
        cancel: threading.Event | None = None) -> Json:
    """`job` in a throwaway worker process (common.guarded.run_guarded)."""
    return run_guarded(job.TARGET, to_json(job), limits=limits, on_progress=on_progress,
                       untrusted_phase=lambda p: p.get("stage") in untrusted_stages,
                       cancel=cancel)


def to_json(job: Job) -> Json:
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
