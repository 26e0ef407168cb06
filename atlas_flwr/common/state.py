"""A model state as both sides hold it: tensor name -> numpy array, PEFT's LoRA key names, and digests.

Pure numpy: the server's math (``strategies/``) and the client's code import it, neither imports the other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

#: An adapter or a head: PEFT state names (adapter name stripped) -> arrays.
State = Mapping[str, np.ndarray]

LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"


def module_ranks(adapter: State) -> dict[str, int]:
    """Module name -> LoRA rank, read from the ``lora_A`` shapes of a PEFT adapter state."""
    return {k[: -len(LORA_A_SUFFIX)]: int(v.shape[0]) for k, v in adapter.items() if k.endswith(LORA_A_SUFFIX)}


def state_digest(*states: State) -> str:
    """A content digest of states: equal digests mean equal tensors (used to share evaluations)."""
    digest = hashlib.sha256()
    for state in states:
        for key in sorted(state):
            value = np.ascontiguousarray(state[key])
            digest.update(key.encode())
            digest.update(str((value.dtype, value.shape)).encode())
            digest.update(value.tobytes())
    return digest.hexdigest()[:16]
