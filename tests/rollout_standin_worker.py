"""One rank of tests/test_rollout_engines.py's torchrun check: a short GRPO run with the stand-in engine
(``rollout.engine=standin``, each rank its own), then each rank writes what its engine received to
``OUT/rank<r>.json``: the pushes (step, names, checksum), the rows of each rollout, and the checksum
of the engine's own weights at the end.

    torchrun --standalone --nproc_per_node=2 tests/rollout_standin_worker.py OUT [OVERRIDE ...]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)

from rlx import distributed  # noqa: E402
from rlx.rollout.engines import checksum  # noqa: E402
from rlx.train import train  # noqa: E402
from tests.conftest import TINY, compose_cfg  # noqa: E402
from tests.rollout_standin import BUILT, StandInEngine  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    extra = sys.argv[2:]  # e.g. trainer.parallel=fsdp2
    cfg = compose_cfg([*TINY, "algo=grpo", "rollout.engine=standin", "logger=none", *extra])
    train(cfg, run_dir=out / "run")
    engine = BUILT[-1]
    assert isinstance(engine, StandInEngine)
    record = {
        "world_size": distributed.world()[1],
        "pushes": engine.pushes,
        "rows": engine.rows,
        "final": checksum(engine.copy.model.named_parameters()),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    distributed.shutdown()


if __name__ == "__main__":
    main()
