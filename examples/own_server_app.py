"""A user's own ServerApp that runs ATLAS-FL's strategy (point ``serverapp`` in pyproject.toml here)."""

from flwr.app import ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from atlas_flwr.common.config import Config
from atlas_flwr.server import AtlasStrategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    strategy = AtlasStrategy(Config.from_run_config(context.run_config))  # the preset in `strategy`
    result = strategy.start(grid=grid, train_config=ConfigRecord({"note": "from my ServerApp"}))
    log(20, "final metrics per task: %s", result.evaluate_metrics_clientapp[max(result.evaluate_metrics_clientapp)])
    log(20, "client 0's adapter: %d tensors; results in %s", len(strategy.pipeline.adapters[0]), strategy.run_dir)
