"""Keep library chatter out of the per-round log lines a person follows."""

from __future__ import annotations

import warnings


def quiet_libraries() -> None:
    """Silence per-call progress bars and deprecation notices of datasets/transformers/ray."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
