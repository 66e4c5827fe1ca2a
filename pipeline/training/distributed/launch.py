"""How the train stage starts its processes: alone, under torchrun on the GPUs of one host, or under
torchrun on several hosts that meet through a c10d rendezvous. The topology is the machine's, not the
experiment's, so it comes from the environment (as torchrun and SLURM name it), never from params.yaml:
the same params give the same model on 1 GPU or on 2 x 8.

    NPROC_PER_NODE  processes (GPUs) on this host                    default 1
    NNODES          hosts in the run                                 default SLURM_NNODES, else 1
    NODE_RANK       this host's place, 0 .. NNODES-1                 default SLURM_NODEID, else 0
    RDZV_ENDPOINT   host:port where the hosts meet (node 0 serves)   required with NNODES > 1
    RDZV_ID         the run's name at the rendezvous                 default SLURM_JOB_ID, else gpt2-train
    NODE_ADDR       this host's address the others reach it at      default: torchrun's guess (its hostname)
    RDZV_TIMEOUT    seconds a host waits at the rendezvous for all   default 1800

Each run takes NPROC_PER_NODE GPUs no other run holds (pipeline.core.device.claim_gpus).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys

from pipeline.core.errors import PipelineError

log = logging.getLogger(__name__)
RDZV_PORT = 29400


WHAT = {"NPROC_PER_NODE": "a process count; set it to the number of GPUs on this host, e.g. 2",
        "RDZV_TIMEOUT": "a number of seconds; set it to how long the hosts may wait for each other, e.g. 1800",
        "NNODES": "a node count; set it to the number of hosts, e.g. 2",
        "NODE_RANK": "a node rank; set it to 0 on the first host, 1 on the next, ..."}


def count(env: dict[str, str], name: str, default: str, least: int) -> int:
    value = env.get(name) or default
    if not value.isdigit() or int(value) < least:
        raise PipelineError(f"{name}={value!r} is not {WHAT[name]}")
    return int(value)


def processes_per_node(env: dict[str, str]) -> int:
    return count(env, "NPROC_PER_NODE", "1", 1)


def torchrun_arguments(env: dict[str, str], argv: list[str]) -> list[str] | None:
    """torchrun's arguments for this stage (None: train here, as one process or as a worker torchrun
    already started)."""
    if "LOCAL_RANK" in env:  # torchrun sets it in its workers
        return None
    procs = processes_per_node(env)
    nodes = count(env, "NNODES", env.get("SLURM_NNODES", "1"), 1)
    stage = ["-m", "pipeline.train", *argv]
    if nodes == 1:
        return ["--standalone", f"--nproc_per_node={procs}", *stage] if procs > 1 else None
    rank = count(env, "NODE_RANK", env.get("SLURM_NODEID", "0"), 0)
    if rank >= nodes:
        raise PipelineError(f"NODE_RANK={rank} with NNODES={nodes}: ranks go from 0 to {nodes - 1}")
    endpoint = env.get("RDZV_ENDPOINT", "")
    if not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+:\d{1,5}", endpoint):
        raise PipelineError(f"NNODES={nodes} needs RDZV_ENDPOINT=host:port, where the nodes meet (node 0's "
                            f"address, e.g. 10.0.0.1:{RDZV_PORT}); got {endpoint!r}")
    run_id = env.get("RDZV_ID") or env.get("SLURM_JOB_ID") or "gpt2-train"
    # is_host: node 0 serves the rendezvous store; torchrun's own test (is the endpoint's name this host?)
    # fails where the hostname resolves to 127.0.0.1, and the store then never starts. join_timeout: the
    # other nodes start their train stage at once and wait while node 0 runs download and preprocess
    arguments = [f"--nnodes={nodes}", f"--nproc_per_node={procs}", f"--node_rank={rank}", "--rdzv_backend=c10d",
                 f"--rdzv_endpoint={endpoint}", f"--rdzv_id={run_id}",
                 f"--rdzv_conf=is_host={int(rank == 0)},join_timeout={count(env, 'RDZV_TIMEOUT', '1800', 1)}"]
    if env.get("NODE_ADDR"):  # else workers may be told MASTER_ADDR=localhost and wait for ever
        arguments.append(f"--local_addr={env['NODE_ADDR']}")
    return [*arguments, *stage]


def stop_with_the_agent() -> None:
    """In a worker: die when torchrun's agent (the stage process) dies. torchrun starts each worker in a
    session of its own, so a SIGKILL of the stage (a scheduler, the OOM killer, kill -9 of dvc repro)
    would leave the workers training on, to write outputs nobody waits for, beside the next run."""
    if sys.platform != "linux":
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the agent was gone before the line above
        os.kill(os.getpid(), signal.SIGKILL)


def run_under_torchrun() -> bool:
    """Where the environment asks for several processes or hosts, run this stage's workers under torchrun
    (its elastic agent, in this process) and return True once they all finished: data-parallel or
    sharded training through the Trainer (NCCL on GPUs, gloo on CPU) without changing dvc.yaml. When a
    worker fails, torchrun stops the others (and, through the rendezvous, the other hosts'); this stage
    then ends in one line instead of torchrun's report: none where the worker printed its own error line
    (exit 2), else which process died and how."""
    arguments = torchrun_arguments(dict(os.environ), sys.argv[1:])
    if arguments is None:
        if "LOCAL_RANK" in os.environ:
            stop_with_the_agent()
        return False
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    log.info("launching torchrun %s", " ".join(arguments))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its report: the line below
    try:
        run(get_args_parser().parse_args(arguments))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode == 2:  # a PipelineError: the worker printed its line
            raise SystemExit(2) from None
        how = f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with {failure.exitcode}"
        raise PipelineError(f"train: process {rank} of the run {how}, and torchrun stopped the others; its log above "
                            "says why (out of memory: lower train.per_device_train_batch_size); run again to resume "
                            "from the last checkpoint") from None
    return True
