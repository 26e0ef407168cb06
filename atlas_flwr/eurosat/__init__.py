"""The EuroSAT workload: a small CNN trained with Flower's FedAvg, per-precision wire codecs, and PTQ.

``data`` (npz of JPEGs or the hub, partitions), ``model`` (the CNN), ``codec`` (fp32/fp16/int8 wire
formats), ``train`` (local steps, evaluation), ``server`` and ``client`` (the Flower side), ``ptq``
(the ``atlas-ptq`` post-training quantization comparison).
"""
