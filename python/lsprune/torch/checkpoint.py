"""Checkpoint/resume of a prune: the statistics and results of finished pairs, and the partial
statistics of pairs being accumulated, in a folder (``prune(..., checkpoint=folder)``).

Layout: ``manifest.json`` (format, version, the fingerprint of the model, calibration data and
options, and one entry per pair and stage) and ``.npz`` files, each written to a temporary name
and renamed, with its SHA-256 in the manifest. The manifest is replaced atomically after the
files it names exist, so an interrupted run leaves a consistent folder.

Entries (keys ``"<stage>:<producer>"``; stage ``prune``, or ``budget`` for a global budget's
extra pass):

* ``done``: the pair's complete statistics and its result: for ``prune`` the kept channels and
  the re-fitted consumer weights and bias (the resumed run installs them: no statistics pass
  and no selection for that pair, same bits), for ``budget`` the error path.
* ``partial``: the statistics after the first ``batches`` calibration batches and the position
  sampler's state; written after a batch once ``checkpoint_interval`` seconds have passed since
  the pair's last write, at a point where the engine holds no pending float32 products (at least
  every 4096 rows), so that the resumed pair is bit-identical to an uninterrupted one.

A folder whose fingerprint differs (another model, other weights or calibration data, another
option that changes the result, another lsprune version), an unknown format version, a
missing, truncated or corrupted file, or a manifest naming anything but plain files inside the
folder (a crafted one could otherwise make a resumed run read or delete files elsewhere) is refused
with a ``ValueError`` before anything is written (a bad name before any file is read).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

import lsprune
from lsprune._atomic import atomic_write, sha256_file

FORMAT = "lsprune.torch.checkpoint"
VERSION = 1
MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------------------------- fingerprint
def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def model_hashes(model: nn.Module) -> Dict[str, str]:
    """SHA-256 of the architecture (module types and settings, parameter names, shapes, dtypes)
    and of the parameter and buffer values."""
    arch, params = hashlib.sha256(), hashlib.sha256()
    for name, m in model.named_modules():
        arch.update(f"{name}|{type(m).__module__}.{type(m).__qualname__}|{m.extra_repr()}\n".encode())
    for name, t in model.state_dict(keep_vars=True).items():
        arch.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        params.update(name.encode())
        params.update(_tensor_bytes(t))
    return {"architecture": arch.hexdigest(), "parameters": params.hexdigest()}


def calibration_hash(batches) -> str:
    """SHA-256 of the calibration batches (structure, tensor dtypes, shapes and values)."""
    h = hashlib.sha256()
    for b in batches:
        leaves, spec = tree_flatten(b)
        h.update(str(spec).encode())
        for v in leaves:
            if isinstance(v, torch.Tensor):
                h.update(f"{v.dtype}|{tuple(v.shape)}".encode())
                h.update(_tensor_bytes(v))
            else:
                h.update(f"{type(v).__name__}|{v!r}".encode())
    return h.hexdigest()


def fingerprint(model: nn.Module, batches, options: dict) -> dict:
    """What a checkpoint must match: versions, model, calibration data and the result-changing options
    (``options``: name -> value, compared by their ``repr``)."""
    return {"lsprune": lsprune.__version__, **model_hashes(model), "calibration": calibration_hash(batches),
            "options": {k: repr(v) for k, v in sorted(options.items())}}


def _differences(old: dict, new: dict) -> list:
    out = []
    for k in ("lsprune", "architecture", "parameters", "calibration"):
        if old.get(k) != new.get(k):
            out.append({"lsprune": f"lsprune version ({old.get(k)} -> {new.get(k)})",
                        "architecture": "the model's architecture", "parameters": "the model's weights",
                        "calibration": "the calibration data"}[k])
    oo, no = old.get("options", {}), new.get("options", {})
    for k in sorted(set(oo) | set(no)):
        if oo.get(k) != no.get(k):
            out.append(f"option {k} ({oo.get(k, 'unset')} -> {no.get(k, 'unset')})")
    return out


# ---------------------------------------------------------------------------------------------- files
def _atomic_write(path: str, write) -> None:
    """``write(file)`` into a temporary file next to ``path``, then rename it to ``path``."""
    def fill(tmp):
        with open(tmp, "wb") as f:
            write(f)

    atomic_write(path, fill)


def _plain_name(folder: str, key: str, name) -> str:
    """A file name from the manifest, refused unless it names a regular file right inside ``folder``: the
    names are opened, and unlinked when an entry is replaced, so a crafted manifest must not reach
    elsewhere (absolute paths, separators, ``..``, symbolic links)."""
    seps = {os.sep, os.altsep} - {None}
    if not isinstance(name, str) or name in ("", ".", "..") or "\0" in name or any(c in name for c in seps) \
            or os.path.isabs(name) or os.path.splitdrive(name)[0]:
        raise ValueError(f"checkpoint {folder}: {MANIFEST} names {name!r} for {key}, which is not a plain file name "
                         "in the folder. Nothing was changed; delete the folder or give another one")
    path = os.path.join(folder, name)
    if os.path.islink(path):
        raise ValueError(f"checkpoint {folder}: file {name} of {key} is a symbolic link; checkpoint files are "
                         "plain files. Nothing was changed; delete the folder or give another one")
    return name


class Checkpoint:
    """A checkpoint folder (see the module docstring).

    Parameters
    ----------
    folder : str or os.PathLike
        Created if missing. An existing manifest must match ``fingerprint``.
    fingerprint : dict
        From :func:`fingerprint`.
    interval : float
        Seconds between two partial writes of the same pair (0: whenever possible).
    """

    def __init__(self, folder, fingerprint: dict, interval: float):
        self.folder = os.fspath(folder)
        self.fingerprint = fingerprint
        self.interval = float(interval)
        self.entries: Dict[str, dict] = {}
        self._last: Dict[str, float] = {}
        self.resumed = 0  # entries found at open
        path = os.path.join(self.folder, MANIFEST)
        if os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise ValueError(f"checkpoint={self.folder!r} is a file; give a folder")
        if os.path.exists(path):
            self._open(path)

    def _open(self, path: str) -> None:
        try:
            with open(path, "rb") as f:
                data = json.loads(f.read().decode())
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"checkpoint {self.folder}: {MANIFEST} is unreadable (truncated or corrupted?): {e}. "
                             "Nothing was changed; delete the folder or give another one") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"checkpoint {self.folder}: {MANIFEST} is not an lsprune checkpoint manifest")
        if data.get("version") != VERSION:
            raise ValueError(f"checkpoint {self.folder} has format version {data.get('version')}; this lsprune "
                             f"reads version {VERSION}. Delete the folder or give another one")
        diff = _differences(data.get("fingerprint", {}), self.fingerprint)
        if diff:
            raise ValueError(f"checkpoint {self.folder} was written for another run: " + "; ".join(diff) +
                             ". Nothing was changed; give a new folder (or delete this one) to start over")
        entries = data.get("entries")
        if not isinstance(entries, dict):
            raise ValueError(f"checkpoint {self.folder}: {MANIFEST} has no entries (corrupted?)")
        for key, e in entries.items():  # every name is checked before any file is read
            self._check_entry(key, e)
        for key, e in entries.items():
            for fname, digest in e["sha256"].items():
                p = os.path.join(self.folder, fname)
                if not os.path.isfile(p):
                    raise ValueError(f"checkpoint {self.folder}: file {fname} of {key} is missing. Nothing was "
                                     "changed; delete the folder or give another one")
                if sha256_file(p) != digest:
                    raise ValueError(f"checkpoint {self.folder}: file {fname} of {key} is truncated or corrupted "
                                     "(checksum mismatch). Nothing was changed; delete the folder or give another "
                                     "one")
        self.entries = entries
        self.resumed = len(entries)

    def _check_entry(self, key, e) -> None:
        """One manifest entry's shape: a known state, the files it loads among its checksummed files, plain
        file names only."""
        def malformed(what):
            return ValueError(f"checkpoint {self.folder}: {MANIFEST} entry {key!r} {what} (corrupted?). Nothing "
                              "was changed; delete the folder or give another one")

        if not isinstance(e, dict) or e.get("state") not in ("done", "partial"):
            raise malformed("has no known state")
        sha = e.get("sha256")
        if not isinstance(sha, dict) or not all(isinstance(v, str) for v in sha.values()):
            raise malformed("has no file checksums")
        for fname in sha:
            _plain_name(self.folder, key, fname)
        loads = [e[k] for k in ("stats", "result") if k in e]
        if ("stats" if e["state"] == "partial" else "result") not in e or \
                any(not isinstance(n, str) or n not in sha for n in loads):
            raise malformed("names a file without a checksum")
        if e["state"] == "partial" and (not isinstance(e.get("batches"), int) or isinstance(e["batches"], bool)):
            raise malformed("has no batch count")

    # ------------------------------------------------------------------ reading
    def done(self, key: str) -> Optional[dict]:
        e = self.entries.get(key)
        return e if e is not None and e["state"] == "done" else None

    def partial(self, key: str) -> Optional[dict]:
        e = self.entries.get(key)
        return e if e is not None and e["state"] == "partial" else None

    def load_statistics(self, entry: dict) -> lsprune.Statistics:
        return lsprune.Statistics.load(os.path.join(self.folder, entry["stats"]))

    def load_arrays(self, entry: dict) -> Dict[str, np.ndarray]:
        """A finished pair's result (``allow_pickle=False``: an object array is refused, never unpickled)."""
        try:
            with np.load(os.path.join(self.folder, entry["result"]), allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
            raise ValueError(f"checkpoint {self.folder}: file {entry['result']} is not a readable result file "
                             f"(truncated or corrupted?): {e}") from None

    @staticmethod
    def generator_state(entry: dict) -> torch.Tensor:
        return torch.tensor(list(bytes.fromhex(entry["generator"])), dtype=torch.uint8)

    # ------------------------------------------------------------------ writing
    def _file(self, name: str) -> str:
        os.makedirs(self.folder, exist_ok=True)
        return os.path.join(self.folder, name)

    def _commit(self, key: str, entry: dict) -> None:
        """Records ``entry`` in the manifest (atomically), then removes the files it replaces."""
        old = self.entries.get(key)
        self.entries[key] = entry
        data = {"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint, "entries": self.entries}
        text = json.dumps(data, indent=1).encode()
        _atomic_write(self._file(MANIFEST), lambda f: f.write(text))
        if old is not None:
            for fname in set(old.get("sha256", {})) - set(entry["sha256"]):
                try:
                    os.unlink(os.path.join(self.folder, _plain_name(self.folder, key, fname)))
                except OSError:
                    pass

    def want_partial(self, key: str, pending_rows: int) -> bool:
        """Whether to write ``key``'s partial statistics now (interval elapsed, nothing pending)."""
        now = time.monotonic()
        last = self._last.setdefault(key, now)
        return pending_rows == 0 and now - last >= self.interval

    def save_partial(self, key: str, stem: str, stats: lsprune.Statistics, batches: int,
                     generator: torch.Generator) -> None:
        fname = f"{stem}-partial-{batches}.npz"
        path = self._file(fname)
        stats.save(path)
        entry = {"state": "partial", "stats": fname, "batches": int(batches),
                 "generator": bytes(generator.get_state().tolist()).hex(), "sha256": {fname: sha256_file(path)}}
        self._commit(key, entry)
        self._last[key] = time.monotonic()

    def save_done(self, key: str, stem: str, stats: Optional[lsprune.Statistics], arrays: Dict[str, np.ndarray],
                  info: Optional[dict] = None) -> None:
        sha = {}
        entry = {"state": "done", "info": info or {}}
        if stats is not None:
            fname = f"{stem}.npz"
            stats.save(self._file(fname))
            sha[fname] = sha256_file(self._file(fname))
            entry["stats"] = fname
        rname = f"{stem}-result.npz"
        _atomic_write(self._file(rname), lambda f: np.savez(f, **arrays))
        sha[rname] = sha256_file(self._file(rname))
        entry["result"] = rname
        entry["sha256"] = sha
        self._commit(key, entry)
