"""The buyer's local records: pinned seller keys and one folder per trial.

    HOME/sellers.json                    seller address -> pinned Ed25519 key (hex)
    HOME/trials/MODEL/latest             id of the newest completed trial of MODEL
    HOME/trials/MODEL/bought             id of the trial of MODEL bought last
    HOME/trials/MODEL/TRIAL/             offer, receipts, results, secret key, model, verdict
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from common.errors import BadInput, NotFound, Refused
from common.protocol import Signed
from common.signing import fingerprint
from common.wire import envelope_from_json, envelope_to_json

log = logging.getLogger(__name__)
PASSPHRASE_ENV = "GIMME_BUYER_PASSPHRASE"
FloatArray = npt.NDArray[np.float64]


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


class Workspace:
    def __init__(self, home: Path) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True, mode=0o700)

    # ----- seller keys (trust on first use) -----

    def _pins(self) -> dict[str, str]:
        path = self.home / "sellers.json"
        pins: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
        return pins

    def pinned_key(self, address: str) -> bytes | None:
        pins = self._pins()
        return bytes.fromhex(pins[address]) if address in pins else None

    def pinned_keys(self) -> list[bytes]:
        return [bytes.fromhex(v) for v in self._pins().values()]

    def pin_key(self, address: str, key: bytes) -> None:
        pins = self._pins()
        if address in pins and pins[address] != key.hex():
            raise Refused(f"the seller at {address} now presents key {fingerprint(key)}, not "
                          f"the pinned {fingerprint(bytes.fromhex(pins[address]))}: this may "
                          f"be another party. If the seller really changed its key, remove "
                          f"its entry from {self.home / 'sellers.json'}")
        pins[address] = key.hex()
        (self.home / "sellers.json").write_text(json.dumps(pins, indent=2))

    # ----- trials -----

    # A trial's folder exists from its offer on, but the markers move only when a trial
    # completes (latest) or is paid for (bought): an interrupted trial never becomes what
    # buy, verify or run pick by default.

    def new_trial(self, model_id: str, trial_id: str) -> TrialFolder:
        folder = TrialFolder(self.home / "trials" / model_id / trial_id)
        folder.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return folder

    def finish_trial(self, model_id: str, folder: TrialFolder) -> None:
        (self.home / "trials" / model_id / "latest").write_text(folder.trial_id)

    def mark_bought(self, model_id: str, folder: TrialFolder) -> None:
        (self.home / "trials" / model_id / "bought").write_text(folder.trial_id)

    def trial(self, model_id: str, trial_id: str | None = None) -> TrialFolder:
        """The named trial of `model_id`, by default its latest completed one."""
        if trial_id is None:
            trial_id = self._marked(model_id, "latest")
            if trial_id is None:
                raise NotFound(f"no completed trial of {model_id!r} in {self.home}; run "
                               f"'gimme-buyer trial {model_id} --data FILE' first")
        folder = TrialFolder(self.home / "trials" / model_id / trial_id)
        if not folder.path.is_dir():
            raise NotFound(f"no trial {trial_id} of {model_id!r} in {self.home}")
        return folder

    def bought_trial(self, model_id: str) -> TrialFolder | None:
        trial_id = self._marked(model_id, "bought")
        return self.trial(model_id, trial_id) if trial_id else None

    def owned_trial(self, model_id: str, trial_id: str | None = None) -> TrialFolder:
        """The named trial, by default the one bought last, else the latest completed."""
        if trial_id is None:
            trial_id = self._marked(model_id, "bought")
        return self.trial(model_id, trial_id)

    def unfinished_trial(self, model_id: str) -> TrialFolder:
        """The newest trial of `model_id` that was interrupted before its report."""
        base = self.home / "trials" / model_id
        folders = [TrialFolder(p.parent) for p in base.glob("*/offer.json")
                   if not (p.parent / "report.json").exists()]
        if not folders:
            raise NotFound(f"no interrupted trial of {model_id!r} in {self.home} to resume; "
                           f"run 'gimme-buyer trial {model_id} --data FILE' without --resume")
        return max(folders, key=lambda f: (f.path / "offer.json").stat().st_mtime)

    def _marked(self, model_id: str, marker: str) -> str | None:
        path = self.home / "trials" / model_id / marker
        return path.read_text().strip() if path.exists() else None


class TrialFolder:
    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def trial_id(self) -> str:
        return self.path.name

    # ----- signed documents -----

    def save_signed(self, name: str, signed: Signed) -> None:
        (self.path / f"{name}.json").write_text(envelope_to_json(signed))

    def load_signed(self, name: str) -> Signed:
        return envelope_from_json(self.read(f"{name}.json"), f"{self.path / name}.json")

    def signed_names(self, prefix: str) -> list[str]:
        return sorted(p.stem for p in self.path.glob(f"{prefix}*.json"))

    # ----- plain files -----

    def write(self, name: str, data: bytes) -> Path:
        path = self.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def read(self, name: str) -> bytes:
        path = self.path / name
        if not path.exists():
            raise NotFound(f"{path} is missing")
        return path.read_bytes()

    def write_private(self, name: str, data: bytes) -> Path:
        """A file only the owner can read (keys)."""
        path = self.path / name
        _write_private(path, data)
        return path

    def has(self, name: str) -> bool:
        return (self.path / name).exists()

    def save_json(self, name: str, value: Any) -> Path:
        return self.write(name, json.dumps(value, indent=2).encode())

    def load_json(self, name: str) -> Any:
        return json.loads(self.read(name))

    def save_rows(self, rows: FloatArray, labels: tuple[str, ...]) -> None:
        np.savez(self.path / "rows.npz", X=rows, y=np.array(labels, dtype=str))

    # ----- the trial's HE secret key -----

    def save_secret_key(self, data: bytes) -> None:
        """Encrypted under $GIMME_BUYER_PASSPHRASE when set; otherwise mode 0600 + warning."""
        passphrase = os.environ.get(PASSPHRASE_ENV)
        if passphrase:
            salt, nonce = os.urandom(16), os.urandom(12)
            sealed = AESGCM(_derive(passphrase, salt)).encrypt(nonce, data, b"gimme-secret-key")
            _write_private(self.path / "secret.key.enc", salt + nonce + sealed)
            return
        _write_private(self.path / "secret.key", data)
        log.warning("the trial's secret key is stored unencrypted (mode 0600) at %s for the "
                    "evidence bundle; set %s to encrypt it", self.path / "secret.key",
                    PASSPHRASE_ENV)

    def load_secret_key(self) -> bytes:
        sealed_path = self.path / "secret.key.enc"
        if sealed_path.exists():
            passphrase = os.environ.get(PASSPHRASE_ENV)
            if not passphrase:
                raise BadInput(f"the trial's secret key is encrypted; set {PASSPHRASE_ENV}")
            blob = sealed_path.read_bytes()
            try:
                return AESGCM(_derive(passphrase, blob[:16])).decrypt(
                    blob[16:28], blob[28:], b"gimme-secret-key")
            except Exception as exc:
                raise BadInput(f"wrong {PASSPHRASE_ENV} for {sealed_path}") from exc
        return self.read("secret.key")


def _derive(passphrase: str, salt: bytes) -> bytes:
    return Scrypt(salt=salt, length=32, n=2**15, r=8, p=1).derive(passphrase.encode())
