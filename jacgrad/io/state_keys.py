"""The keys of a training checkpoint: the state dict inside its wrapper, and the prefix a trainer
puts before every key.

- ``unwrap(state)``: ``{"state_dict": sd, "epoch": ..., "optimizer_states": ...}`` (Lightning's
  ``.ckpt``) and ``{"model": sd, "optimizer": ...}`` (the usual hand-written checkpoint) hold the
  state dict ``sd`` under one key; everything beside it (epochs, optimiser states) is ignored.
- ``strip_prefix(keys, fits)``: ``model.fc1.weight`` (a LightningModule keeping its network in
  ``self.model``), ``module.fc1.weight`` (``DistributedDataParallel``), ``_orig_mod.`` (a
  ``torch.compile``-d module): the shortest prefix of whole dotted components, shared by every
  key, whose removal makes the keys fit what is expected.

    >>> strip_prefix(["model.0.weight", "model.0.bias"], lambda ks: all(k[0].isdigit() for k in ks))
    'model.'
"""

from __future__ import annotations

from typing import Callable, Sequence

from .file_safety import NetworkFileError as Bad

__all__ = ["WRAPPERS", "strip_prefix", "unwrap"]

WRAPPERS = ("state_dict", "model")  # the keys a checkpoint keeps its state dict under, in this order


def unwrap(state):
    """``(state dict, wrapper key)``: ``state[key]`` for the one wrapper key (``WRAPPERS``) whose
    value is a dict, or ``(state, "")`` when there is none. A dict holding both is ambiguous: a
    ``NetworkFileError`` naming them."""
    if not isinstance(state, dict):
        return state, ""
    found = [k for k in WRAPPERS if isinstance(state.get(k), dict)]
    if len(found) > 1:
        raise Bad(f"holds a state dict under both {' and '.join(repr(k) for k in found)}: save one of them "
                  f"(torch.save(checkpoint['state_dict'], path))")
    return (state[found[0]], found[0]) if found else (state, "")


def strip_prefix(keys: Sequence[str], fits: Callable[[list], bool]) -> str | None:
    """The prefix to remove from every key of ``keys`` so that ``fits(stripped keys)``: ``""`` when
    they fit as they are, else the shortest run of leading dotted components that every key shares
    (``"model."``, ``"module.model."``) and that makes them fit; None when none does."""
    keys = list(keys)
    if fits(keys):
        return ""
    if not keys:
        return None
    parts = keys[0].split(".")
    for n in range(1, len(parts)):
        prefix = ".".join(parts[:n]) + "."
        if not all(k.startswith(prefix) for k in keys):
            return None
        if fits([k[len(prefix):] for k in keys]):
            return prefix
    return None
