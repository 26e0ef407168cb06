"""A small in-process Grid: runs a ClientApp for N nodes, no SuperLink, no Ray.

For tests and benchmarks of the ServerApp and ClientApp logic. Each node keeps its own
``Context`` (and so its ``context.state``) across messages, as the simulation engine does.
Messages are copied on the way in and out, so neither side can mutate the other's objects.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

_CLIENT_APP_EXCEPTION = 2  # the error code the Flower runtime uses for a ClientApp exception


class LocalGrid(Grid):
    """Deliver each pushed message to ``client_app`` at once and keep the reply for pulling.

    Parameters
    ----------
    client_app : ClientApp
        The app every node runs.
    run_config : mapping
        The run config every node sees.
    num_nodes : int
        Nodes get ``partition-id`` 0..N-1 and ``num-partitions`` N in their node config.
    """

    def __init__(self, client_app: ClientApp, run_config: Mapping, num_nodes: int) -> None:
        self.client_app = client_app
        # Messages take their run id and source node from the process's task identity,
        # which the Flower runtime sets; in-process, this grid plays the SuperLink.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
        self.contexts = {
            1000 + i: Context(
                run_id=1,
                node_id=1000 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i in range(num_nodes)
        }
        self._replies: dict[str, Message] = {}
        self.messages_seen: list[str] = []

    @property
    def run(self):
        raise NotImplementedError("LocalGrid has no Run")

    def set_run(self, run) -> None:
        raise NotImplementedError("LocalGrid has no Run")

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        """The simulated node ids."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Run the ClientApp on each message now; its reply waits for ``pull_messages``."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            self.messages_seen.append(msg.metadata.message_type)
            inbound = copy.deepcopy(msg)
            context = self.contexts[msg.metadata.dst_node_id]
            try:
                reply = self.client_app(inbound, context)
            except Exception as err:  # noqa: BLE001 - the real runtime turns a ClientApp exception into an error reply
                reply = Message(
                    Error(code=_CLIENT_APP_EXCEPTION, reason=f"{type(err).__name__}: {err}"), reply_to=inbound
                )
            self._replies[msg.metadata.message_id] = copy.deepcopy(reply)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Replies for the given message ids (each is handed out once)."""
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull everything (replies are ready at once)."""
        return self.pull_messages(self.push_messages(messages))
