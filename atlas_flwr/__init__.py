"""ATLAS-FL: multi-task federated LoRA fine-tuning as a Flower app."""

__version__ = "0.1.0"
