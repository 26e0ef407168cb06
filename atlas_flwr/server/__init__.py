"""The server's side of the language-model run: messages (protocol), the plan, reporting, and AtlasStrategy."""

from atlas_flwr.server.strategy import AtlasStrategy

__all__ = ["AtlasStrategy"]
