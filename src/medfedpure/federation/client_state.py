"""What a hospital keeps between rounds: in its node's memory (`context.state`) and, when the
run names a folder, on its own disk (`clients/client_NN/`), where a restarted node finds it.

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
from medfedpure.runfolder import saved_round
from medfedpure.storage import load_tensors, read_json, save_tensors, write_json

log = logging.getLogger(__name__)

GATE_KEY = "gate"  # context.state entry holding what stays: the attention nets (a baseline's own part)
SCANS_KEY = "pfeddef-adversarial"  # pFedDef's current adversarial training scans


class HospitalState:
    def __init__(self, context: Context, folder: Path | None, client: int) -> None:
        self.context, self.folder, self.client = context, folder, client

    # ------------------------------------------------------------------ the gate
    def gate(self, resume_round: int = 0) -> dict[str, torch.Tensor] | None:
        """This hospital's gate, or None before its first round. After a restart the node's memory
        is empty: a resumed run (`resume_round` > 0) takes the gate saved at that round."""
        if GATE_KEY not in self.context.state and resume_round > 0:
            self.context.state[GATE_KEY] = ArrayRecord(self._restore_gate(resume_round))
        if GATE_KEY not in self.context.state:
            return None
        return self.context.state[GATE_KEY].to_torch_state_dict()

    def _restore_gate(self, rnd: int) -> dict[str, torch.Tensor]:
        for name in ("gate.safetensors", "gate_prev.safetensors"):
            path = self.folder / name if self.folder else None
            if path is not None and path.exists() and saved_round(path) == rnd:
                history = self.folder / "history.json"
                if history.exists():  # forget the rounds the interrupted run did not finish
                    write_json(history, [h for h in read_json(history) if h["round"] <= rnd])
                return load_tensors(path)
        raise FileNotFoundError(f"cannot resume: no gate from round {rnd} in '{self.folder}'")

    def save_gate(self, gate: dict[str, torch.Tensor], rnd: int) -> None:
        """In memory, and on disk with the previous round's gate kept beside the new one."""
        self.context.state[GATE_KEY] = ArrayRecord(gate)
        if self.folder is None:
            return
        path = self.folder / "gate.safetensors"
        if path.exists() and saved_round(path) != rnd:
            path.replace(self.folder / "gate_prev.safetensors")
        save_tensors(path, gate, {"round": str(rnd), "client": str(self.client)})

    # ------------------------------------------------------------------ history
    def append_history(self, entry: dict) -> None:
        """The hospital's own log; it stays on the client's disk. A new run starts it afresh."""
        if self.folder is None:
            return
        path = self.folder / "history.json"
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
