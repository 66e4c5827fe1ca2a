"""A run across processes, GPUs and hosts, in one home: the torchrun the train stage becomes (launch.py) and
DeepSpeed ZeRO sharding (sharding.py)."""
