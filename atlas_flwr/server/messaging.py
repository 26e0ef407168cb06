"""Send messages and collect replies with a short poll.

``Grid.send_and_receive`` of the Deployment Engine sleeps 3 s between polls; a push then a
pull loop at ``poll_interval`` keeps a round trip near the transport's own latency.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from flwr.app import Message
from flwr.serverapp import Grid


def exchange(
    grid: Grid, messages: Sequence[Message], *, timeout: float | None = None, poll_interval: float = 0.02
) -> list[Message | None]:
    """Push ``messages`` and pull their replies; ``None`` marks a reply that did not come in time.

    The result is in the order of ``messages``, whatever order the replies arrive in.
    """
    ids = list(grid.push_messages(messages))
    if len(ids) != len(messages):
        raise RuntimeError(f"the grid accepted {len(ids)} of {len(messages)} messages")
    position = {msg_id: i for i, msg_id in enumerate(ids)}
    replies: list[Message | None] = [None] * len(messages)
    pending = set(ids)
    deadline = None if timeout is None else time.monotonic() + timeout
    while pending:
        for reply in grid.pull_messages(list(pending)):
            msg_id = reply.metadata.reply_to_message_id
            if msg_id in pending:
                replies[position[msg_id]] = reply
                pending.discard(msg_id)
        if not pending or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(poll_interval)
    return replies


class PollingGrid(Grid):
    """A grid whose ``send_and_receive`` is :func:`exchange`: Flower's round loop at a 20 ms poll.

    Everything else goes to the wrapped grid. Replies that do not come in time are left out, as
    Flower's own ``send_and_receive`` leaves them out.
    """

    def __init__(self, grid: Grid, on_reply: Callable[[Message], None] | None = None) -> None:
        self.grid = grid
        self.on_reply = on_reply  # sees every reply pulled through this grid (the memory log)

    @property
    def run(self):  # Flower's Run
        return self.grid.run

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    def create_message(self, *args, **kwargs) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        if self.on_reply is not None:
            for reply in replies:
                self.on_reply(reply)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return []
        return [r for r in exchange(self, messages, timeout=timeout) if r is not None]
