"""Jobs that Hydra's submitit launcher runs on SLURM: torch's distributed environment from SLURM's.

With ``hydra/launcher=slurm`` (conf/hydra/launcher/slurm.yaml) submitit writes an sbatch script whose
command is ``srun ... python -m submitit.core._submit``: SLURM starts ``tasks_per_node`` tasks on each
of ``nodes`` nodes and every task runs the same Hydra job. torch's ``env://`` rendezvous (what rlx uses
under torchrun) reads ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``,
which SLURM does not set: it sets ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` and the node
list. `SlurmDistributedEnv` (a Hydra callback in conf/train.yaml, so it runs in each task before the
training function) maps one onto the other with submitit's own `TorchDistributedEnvironment`: rank and
world size from SLURM's task ids, the master address from the first host of the job's node list, the
port drawn from the job id (the same in every task of a job, different between array jobs). Rather
than parsing SLURM's node-list syntax by hand, rlx leaves that to submitit, which the launcher needs
anyway. Outside a multi-task submitit SLURM job, or when ``RANK`` is already set (torchrun inside an
allocation), it does nothing.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

TORCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def in_submitit_slurm_task() -> bool:
    """True inside a task that submitit's SLURM executor started (its sbatch script exports
    ``SUBMITIT_EXECUTOR=slurm``, and SLURM gives every task ``SLURM_PROCID``)."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "SLURM_PROCID" in os.environ


def export_torch_env_from_slurm() -> dict[str, str]:
    """Export torch's ``env://`` variables from SLURM's for a job of several tasks; returns what was
    exported ({} for a single task, outside submitit's SLURM executor, or when ``RANK`` is set)."""
    if not in_submitit_slurm_task() or "RANK" in os.environ:
        return {}
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) <= 1:
        return {}  # one process: a plain job (trainer.parallel=none), nothing to rendezvous
    from submitit.helpers import TorchDistributedEnvironment

    # set_cuda_visible_devices=False: rlx puts each rank on cuda:LOCAL_RANK itself, as under torchrun
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    exported = {k: os.environ[k] for k in TORCH_ENV}
    log.debug("torch distributed environment from SLURM: %s", exported)
    return exported


class SlurmDistributedEnv(Callback):
    """Hydra callback: `export_torch_env_from_slurm` in each job process, before the job runs."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        export_torch_env_from_slurm()
