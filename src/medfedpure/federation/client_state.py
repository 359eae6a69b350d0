"""What a hospital keeps between rounds: in its node's memory (`context.state`) and, when there is
a state folder (a SuperNode's `state-dir`, or the run's `clients/client_NN/` in a simulation), on
its own disk, where a restarted node finds it.

The gate never leaves the hospital: it is saved every round (the previous round's beside it, so
a run killed mid-round can resume), and so are pFedDef's adversarial scans and the hospital's
own history of rounds.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context

from medfedpure.methods.baselines import AdversarialSet
from medfedpure.runfolder import GATE, HISTORY, saved_round
from medfedpure.storage import load_tensors, read_json, save_tensors, tensor_metadata, write_json

log = logging.getLogger(__name__)

GATE_KEY = "gate"  # context.state entry holding what stays: the attention nets (a baseline's own part)
SCANS_KEY = "pfeddef-adversarial"  # pFedDef's current adversarial training scans


class HospitalState:
    """`folder`: the hospital's state folder (None: memory only). `run`: a tag of the run (its
    training fingerprint), so a gate left on the disk by another run is never taken for this one's."""

    def __init__(self, context: Context, folder: Path | None, client: int, run: str = "") -> None:
        self.context, self.folder, self.client, self.run = context, folder, client, run

    # ------------------------------------------------------------------ the gate
    def gate(self, up_to_round: int) -> dict[str, torch.Tensor] | None:
        """This hospital's gate, or None before its first round. After a restart (a killed SuperNode,
        a resumed run) the node's memory is empty: it takes the latest gate this run saved on the
        hospital's disk at or before `up_to_round`."""
        if GATE_KEY not in self.context.state and up_to_round > 0:
            saved = self._restore_gate(up_to_round)
            if saved is not None:
                self.context.state[GATE_KEY] = ArrayRecord(saved)
        if GATE_KEY not in self.context.state:
            return None
        return self.context.state[GATE_KEY].to_torch_state_dict()

    def _restore_gate(self, up_to_round: int) -> dict[str, torch.Tensor] | None:
        if self.folder is None:
            return None
        found = []
        for path in (self.folder / GATE, self.folder / "gate_prev.safetensors"):
            if path.exists():
                meta = tensor_metadata(path)
                rnd = int(meta.get("round", -1))
                if meta.get("run", self.run) == self.run and 1 <= rnd <= up_to_round:
                    found.append((rnd, path))
        if not found:
            log.warning("%s: no gate of this run saved by round %d; this hospital starts a fresh gate",
                        self.folder, up_to_round)
            return None
        rnd, path = max(found)
        history = self.folder / HISTORY
        if history.exists():
            done = read_json(history)
            lost = sorted({h["round"] for h in done if h.get("phase") == "train" and rnd < h["round"] <= up_to_round})
            if lost:  # it trained those rounds and their gate is gone: an older gate would change the run silently
                raise RuntimeError(f"{self.folder}: this hospital trained round {lost[-1]} but its gate of that round "
                                   f"is gone (gate.safetensors deleted?); only round {rnd}'s is left. Restore the "
                                   "file, or train the run again into another --out")
            write_json(history, [h for h in done if h["round"] <= rnd])  # forget rounds the run did not finish
        log.info("%s: gate restored from round %d (%s)", self.folder, rnd, path.name)
        return load_tensors(path)

    def save_gate(self, gate: dict[str, torch.Tensor], rnd: int) -> None:
        """In memory, and on disk with the previous round's gate kept beside the new one."""
        self.context.state[GATE_KEY] = ArrayRecord(gate)
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / GATE
        if path.exists() and saved_round(path) != rnd:
            path.replace(self.folder / "gate_prev.safetensors")
        save_tensors(path, gate, {"round": str(rnd), "client": str(self.client), "run": self.run})

    # ------------------------------------------------------------------ history
    def append_history(self, entry: dict) -> None:
        """The hospital's own log; it stays on the client's disk. A new run starts it afresh."""
        if self.folder is None:
            return
        path = self.folder / HISTORY
        fresh = entry["phase"] == "train" and entry["round"] == 1
        history = read_json(path) if path.exists() and not fresh else []
        history.append(entry)
        write_json(path, history)

    # ------------------------------------------------------------------ pFedDef's scans (a ScanStore)
    def load_scans(self, made_at: int) -> AdversarialSet | None:
        state = self.context.state
        if SCANS_KEY in state and int(state[SCANS_KEY + "-round"]["round"]) == made_at:
            return AdversarialSet.from_tensors(state[SCANS_KEY].to_torch_state_dict(), made_at)
        path = self.folder / "adversarial_scans.safetensors" if self.folder else None
        if path is None or not path.exists() or saved_round(path) != made_at:
            log.warning("%s: pFedDef scans of round %d are gone (restarted node); making them again",
                        self.folder, made_at)
            return None
        scans = AdversarialSet.from_tensors(load_tensors(path), made_at)
        self._remember(scans)
        return scans

    def save_scans(self, scans: AdversarialSet) -> None:
        self._remember(scans)
        if self.folder is not None:
            save_tensors(self.folder / "adversarial_scans.safetensors", scans.to_tensors(),
                         {"round": str(scans.round)})

    def _remember(self, scans: AdversarialSet) -> None:
        self.context.state[SCANS_KEY] = ArrayRecord(scans.to_tensors())
        self.context.state[SCANS_KEY + "-round"] = ConfigRecord({"round": scans.round})
