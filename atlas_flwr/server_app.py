"""ServerApp: thin Flower glue. The language-model run is :class:`AtlasStrategy`; EuroSAT is FedAvg."""

from __future__ import annotations

from dataclasses import dataclass
from logging import ERROR
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from atlas_flwr.common.config import Config
from atlas_flwr.common.errors import AtlasError
from atlas_flwr.common.quiet import quiet_libraries
from atlas_flwr.eurosat.server import run_eurosat
from atlas_flwr.server import AtlasStrategy
from strategies.pipeline import PersonalizedPipeline

quiet_libraries()
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the config, then run the federation.

    A user error is logged as one line, then re-raised so that Flower marks the run
    ``finished:failed`` with that line as the status details.
    """
    try:
        cfg = Config.from_run_config(context.run_config)
        if cfg.workload == "eurosat":
            run_eurosat(grid, cfg)
            return
        run_federation(grid, cfg)
    except AtlasError as err:
        log(ERROR, "%s", err)
        raise


@dataclass(frozen=True)
class RunOutcome:
    """Where a run wrote its results, and the pipeline with every client's final state."""

    run_dir: Path
    strategy: PersonalizedPipeline


def run_federation(grid: Grid, cfg: Config) -> RunOutcome:
    """Describe, plan (fingerprints, groups, ranks), then ``num-server-rounds`` rounds of train, aggregate,
    evaluate; a checkpoint after every round.

    With ``resume-from`` the plan and every client's state come from the checkpoint, results go on
    in the checkpointed run's directory, and the rounds after the checkpoint's run as they would have.
    """
    strategy = AtlasStrategy(cfg)
    strategy.start(grid)
    return RunOutcome(strategy.run_dir, strategy.pipeline)
