"""Tests of runs past one process: several hosts, sharded resume, experiments at once (make test-scale)."""
