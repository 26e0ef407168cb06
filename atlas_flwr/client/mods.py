"""ClientApp mods."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from logging import ERROR

from flwr.app import Context, Error, Message, MetricRecord
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


#: Where the kernel keeps this process's resident set and its high-water mark, and how to reset the mark.
_STATUS, _CLEAR_REFS = "/proc/self/status", "/proc/self/clear_refs"


def _status_bytes(key: str) -> int:
    with open(_STATUS) as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in {_STATUS}")


def measure_memory(message: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """A ClientApp mod: the memory each message's work takes, as a ``memory`` MetricRecord on its reply.

    ``working-bytes`` is the process's peak resident set while the message is handled (``VmHWM``, after
    ``clear_refs`` resets it) less its resident set before: the model built for the message, its
    activations and optimizer, what the backbone cache and the data add on first use. ``file-bytes`` is
    how much of that is file pages mapped in during the message (``RssFile`` after less before): the
    backbone cache is a read-only mapping of the model's safetensors file, which the kernel can drop and
    read again, so the server sets ``working-bytes - file-bytes`` against the budget. ``rss-bytes`` is the
    resident set before (the runtime, libraries and caches the process already holds). On with
    ``measure-memory = true``, where ``/proc`` allows it (Linux); elsewhere the reply goes out unchanged.
    """
    if not context.run_config.get("measure-memory", False):
        return call_next(message, context)
    try:
        before, file_before = _status_bytes("VmRSS"), _status_bytes("RssFile")
        with open(_CLEAR_REFS, "w") as fh:
            fh.write("5")  # resets VmHWM to the current resident set
    except OSError:
        return call_next(message, context)
    reply = call_next(message, context)
    if reply.has_content():
        peak, mapped = _status_bytes("VmHWM"), max(_status_bytes("RssFile") - file_before, 0)
        reply.content["memory"] = MetricRecord(
            {"working-bytes": max(peak - before, 0), "file-bytes": mapped, "rss-bytes": before}
        )
    return reply
