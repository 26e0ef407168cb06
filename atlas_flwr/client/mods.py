"""ClientApp mods."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from logging import ERROR

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode
from flwr.common.logger import log

from atlas_flwr.common.errors import AtlasError


def one_line_errors(message: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """A ClientApp mod: any exception becomes an error reply whose reason is one line naming the client.

    Without it the runtime sends the whole traceback (a Ray blob in simulation) as the reason. Our own
    errors (AtlasError) already read as one line; anything else is a bug, so its traceback stays in this
    client's log.
    """
    try:
        return call_next(message, context)
    except Exception as err:  # noqa: BLE001 - every failure must reach the server as a reply, not a crash
        if not isinstance(err, AtlasError):
            log(ERROR, "%s", traceback.format_exc())
        where = f"partition {context.node_config.get('partition-id', '?')}"
        text = " ".join(str(err).split()) or "(no message)"
        reason = f"{where}: {type(err).__name__}: {text}"
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
