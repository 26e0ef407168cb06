"""Task clustering with the real model (MiniLM-L6) and real GLUE rows: the issue's two populations.

4 tasks x 3 clients; every client computes its fingerprint exactly as the ClientApp does, the server
clusters with no task labels, and the declared tasks only score the result.
"""

from __future__ import annotations

import numpy as np
import pytest

from atlas_flwr.client.local import compute_fingerprint, fingerprint_settings
from atlas_flwr.common.config import Config
from strategies.clustering import adjusted_rand
from strategies.pipeline import plan_groups


@pytest.mark.parametrize(("partitioner", "min_ari"), [("iid", 1.0), ("dirichlet", 0.9)])
def test_fingerprints_recover_the_tasks(run_config: dict, partitioner: str, min_ari: float) -> None:
    cfg = Config.from_run_config(
        {
            **run_config,
            "tasks": "sst2,mrpc,cola,qnli",
            "clients-per-task": 3,
            "partitioner": partitioner,
            "dirichlet-alpha": 0.5,
            # Fewer rows than the default 256, to keep CI short: 64 still separates the tasks (ARI 1.0 for both
            # populations), 48 no longer does under the Dirichlet split (ARI 0.65).
            "max-samples-per-client": 64,
            "fingerprint-rows": 64,
        }
    )
    prints = np.stack([compute_fingerprint(cfg, c, fingerprint_settings(cfg)).vector for c in range(12)])
    truth = [cfg.task_of(c)[0] for c in range(12)]
    groups, result = plan_groups("learned", truth, prints, cfg.cluster_k_max, cfg.seed)
    assert adjusted_rand(truth, groups) >= min_ari, result.rule
