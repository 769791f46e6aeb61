"""Start-up: keep imports that a run does not use out of the process (issue 12).

transformers' ``trainer_utils`` (which ``get_scheduler`` and ``SchedulerType`` live behind) imports
all of peft at module level whenever peft is installed: about 0.7-4 s of every ``rlx train``, LoRA
or not. transformers has no setting for this, so rlx imports ``trainer_utils`` once with peft hidden
(``sys.modules["peft"] = None`` makes ``importlib.util.find_spec`` report it absent), then un-hides it
and clears transformers' cached ``is_peft_available``: a run with ``model.lora`` still imports peft
itself (rlx.models.hf), and transformers' own later checks see it again. What the hidden import
skips in ``trainer_utils`` is only its ``Trainer`` helpers for unwrapping PEFT models, which rlx never
calls.
"""

from __future__ import annotations

import sys


def import_transformers_without_peft() -> None:
    """Import ``transformers.trainer_utils`` with peft hidden (a no-op once either is imported)."""
    if "transformers.trainer_utils" in sys.modules or sys.modules.get("peft") is not None:
        return
    sys.modules["peft"] = None  # type: ignore[assignment]
    try:
        import transformers.trainer_utils  # noqa: F401
    finally:
        if "peft" in sys.modules and sys.modules["peft"] is None:
            del sys.modules["peft"]
        from transformers.utils import import_utils

        cached = getattr(import_utils.is_peft_available, "cache_clear", None)
        if cached is not None:
            cached()
