"""The training's memory, in one home: what it will need, estimated before anything is moved onto the
device and checked against what is free (estimate.py), and what it used, measured as it ran (peak.py)."""
