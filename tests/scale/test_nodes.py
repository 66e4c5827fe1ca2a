"""Two hosts as two network namespaces on this machine (ip netns, a veth pair, addresses only inside
them): the real train stage on each, meeting through torchrun's c10d rendezvous at node 0, finishes
with the weights of a 2-process run on one host; and a worker killed on one host ends the run on both
in one line each, within seconds, instead of a hang. Needs root and iproute2 (CI has both)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, prepare, write_params

pytestmark = [pytest.mark.scale, pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="network namespaces need root and iproute2 (ip)")]
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
MODEL = {"config_overrides": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64, **NO_DROPOUT}}
# one thread per process on both set-ups: torchrun sets it for 2 processes on a host, not for 1 per host,
# and the thread count changes how a matmul sums, so the last bits of the weights
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def hosts():
    """Two namespaces joined by a veth pair: node 0 at 10.231.0.1, node 1 at 10.231.0.2."""
    tag = os.getpid() % 100_000
    names, links = [f"gpt2n{tag}-{i}" for i in (0, 1)], [f"gv{tag}{c}" for c in "ab"]
    for name in names:
        ip("netns", "add", name)
    try:
        ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
        for i, (name, link) in enumerate(zip(names, links, strict=True)):
            ip("link", "set", link, "netns", name)
            ip("-n", name, "addr", "add", f"10.231.0.{i + 1}/24", "dev", link)
            ip("-n", name, "link", "set", "lo", "up")
            ip("-n", name, "link", "set", link, "up")
        yield list(zip(names, links, strict=True))
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer_dir) -> Path:
    root = prepare(tmp_path_factory.mktemp("nodes"), tokenizer_dir, {"model": MODEL})
    for tag, steps in (("short", 5), ("long", 400)):
        write_params(root, {"model": MODEL, "train": {"per_device_train_batch_size": 2, "max_steps": steps,
                                                      "eval_steps": 5, "save_steps": 100 if steps > 5 else 3,
                                                      "logging_steps": 1}}).rename(root / f"params-{tag}.yaml")
    return root


def train_args(tag: str, params: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.train", "--params", params, "--out", f"{tag}/model", "--checkpoints",
            f"{tag}/checkpoints", "--live-dir", f"{tag}/dvclive", "--metrics", f"{tag}/train.json"]


def start_nodes(root: Path, hosts, tag: str, params: str, port: int) -> list[subprocess.Popen]:
    nodes = []
    for rank, (namespace, link) in enumerate(hosts):
        env = {**ENV, "NNODES": "2", "NODE_RANK": str(rank), "RDZV_ENDPOINT": f"10.231.0.1:{port}",
               "RDZV_ID": tag, "NODE_ADDR": f"10.231.0.{rank + 1}", "GLOO_SOCKET_IFNAME": link}
        nodes.append(subprocess.Popen(["ip", "netns", "exec", namespace, *train_args(tag, params)], cwd=root, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return nodes


def test_two_hosts_train_the_weights_of_two_processes_on_one(prepared, hosts):
    one_host = subprocess.run(train_args("one-host", "params-short.yaml"), cwd=prepared, capture_output=True,
                              text=True, timeout=600, env={**ENV, "NPROC_PER_NODE": "2"})
    assert one_host.returncode == 0, one_host.stderr[-3000:]
    nodes = start_nodes(prepared, hosts, "two-hosts", "params-short.yaml", 29411)
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-3000:]
    metrics = [json.loads((prepared / tag / "train.json").read_text()) for tag in ("one-host", "two-hosts")]
    assert metrics[0]["world_size"] == metrics[1]["world_size"] == 2
    assert metrics[0]["final_train_loss"] == metrics[1]["final_train_loss"]
    a, b = (load_file(prepared / tag / "model/model.safetensors") for tag in ("one-host", "two-hosts"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # gloo sums two ranks the same way over a veth as on a host


def test_a_worker_killed_on_one_host_ends_both_in_one_line(prepared, hosts):
    nodes = start_nodes(prepared, hosts, "killed", "params-long.yaml", 29412)
    live = prepared / "killed/checkpoints"
    deadline = time.monotonic() + 300
    while not list(live.glob("*/dvclive/plots/metrics/train/loss.tsv")) and time.monotonic() < deadline:
        time.sleep(0.1)  # training has started on both
    time.sleep(1)
    agent = psutil.Process(nodes[1].pid)  # ip netns exec execs the stage, which runs torchrun's agent
    (worker,) = [p for p in agent.children() if "pipeline.train" in " ".join(p.cmdline())]
    killed = time.monotonic()
    os.kill(worker.pid, signal.SIGKILL)
    errors = []
    for node in nodes:
        _, err = node.communicate(timeout=120)
        assert node.returncode == 2 and "Traceback" not in err, err[-3000:]
        errors.append([line for line in err.splitlines() if line.startswith("error:")])
    print(f"both hosts ended {time.monotonic() - killed:.1f} s after the kill:", errors)
    assert time.monotonic() - killed < 60
    assert len(errors[0]) == 1 and "lost another process of the run" in errors[0][0]
    assert len(errors[1]) == 1 and "process 1 of the run was killed by SIGKILL" in errors[1][0]
    assert not (prepared / "killed/model").exists() and not (prepared / "killed/train.json").exists()
