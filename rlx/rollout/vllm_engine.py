"""``rollout.engine=vllm``: vLLM colocated in each training process (``pip install 'rlx[vllm]'``).

UNTESTED HERE: this machine has no GPU and vLLM is not installed (it is GPU-only and pins its own
torch), so `VLLMEngine` has never run in rlx's test suite. What is tested on CPU: the mapping of
rlx's sampling settings to vLLM's (`sampling_params_kwargs`), the conversion of vLLM's outputs to
rlx's ``[N, T]`` tensors (`pad_completions`), the refusals (`rlx.rollout.engines.check_engine`), and
the engine interface with a stand-in engine (tests/test_rollout_engines.py).

The layout is TRL's ``vllm_mode="colocate"`` (``trl/generation/vllm_generation.py``): one ``vllm.LLM``
per training process, tensor parallel size 1 (under torchrun with
``distributed_executor_backend="external_launcher"``: each rank's engine joins the job's process group
instead of spawning workers), V1's engine core in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so
the model is reachable, a share of the GPU's memory (``rollout.vllm_gpu_memory_utilization``),
optionally sleeping between rollouts (``rollout.vllm_enable_sleep_mode``).

Written for rlx rather than taken from TRL: rlx hands vLLM token ids (no tokenizer in vLLM:
``skip_tokenizer_init``), starts it from the policy's config with dummy weights and pushes its own
weights at once, and reads only the token ids back (the old log-probs are the policy's, recomputed
by `rlx.rollout.engines.recompute_old_logp`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from rlx.errors import RlxError
from rlx.models.policy import completion_mask
from rlx.rollout.engines import ENGINES, RolloutEngine

if TYPE_CHECKING:
    from rlx.models import Policy, Sampling


def sampling_params_kwargs(sampling: Sampling, max_new: int, eos_id: int | None) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments that sample as `Policy.generate` does with
    ``sampling``: the temperature-scaled distribution filtered by top-k then top-p, exactly
    ``max_new`` tokens at most, stopping at (and keeping) the EOS token; no penalties, no min-p,
    no minimum length. One completion per request (the prompts come already repeated G times, as
    TRL's colocated mode sends them). vLLM's top-k "off" is -1 (rlx's is 0)."""
    return {
        "n": 1,
        "temperature": float(sampling.temperature),
        "top_k": int(sampling.top_k) if sampling.top_k > 0 else -1,
        "top_p": float(sampling.top_p),
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "max_tokens": int(max_new),
        "min_tokens": 0,
        "stop_token_ids": [eos_id] if eos_id is not None else None,
        "ignore_eos": eos_id is None,  # no EOS in rlx's tokenizer: always max_new tokens, as generate()
        "detokenize": False,  # rlx decodes; vLLM has no tokenizer here
        "logprobs": None,  # the policy scores the tokens itself
    }


def pad_completions(
    completions: list[list[int]],
    stopped: list[bool],
    max_new: int,
    eos_id: int | None,
    pad_id: int,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """vLLM's completion ids (one list per row, ``stopped``: its finish reason was ``stop``) as rlx's
    ``[N, max_new]`` ids, right-padded with the pad token, and the mask (1.0 through the first EOS),
    as `Policy.generate` returns them. A row that stopped at EOS keeps the EOS token (appended where
    a vLLM version leaves it out of ``token_ids``)."""
    rows: list[list[int]] = []
    for ids, stop in zip(completions, stopped, strict=True):
        ids = list(ids)[:max_new]
        if stop and eos_id is not None and eos_id not in ids and len(ids) < max_new:
            ids.append(eos_id)
        rows.append(ids + [pad_id] * (max_new - len(ids)))
    tokens = torch.tensor(rows, dtype=torch.long, device=device).view(len(rows), max_new)
    return tokens, completion_mask(tokens, eos_id).to(tokens.device)


class VLLMEngine(RolloutEngine):
    """vLLM's offline ``LLM`` in this process, on this rank's GPU. UNTESTED HERE (no GPU, no vLLM)."""

    name = "vllm"

    def __init__(
        self,
        policy: Policy,
        *,
        gpu_memory_utilization: float,
        enable_sleep_mode: bool,
        max_model_len: int | None,
        seed: int,
    ) -> None:
        if not policy.uses_hf_generate:
            raise RlxError(
                f"rollout.engine=vllm needs a transformers causal LM of an architecture vLLM supports "
                f"(model=hf, tiny_gpt or char_gpt), got model {policy.name}"
            )
        if getattr(policy.model, "peft_config", None):
            raise RlxError(
                "rollout.engine=vllm pushes whole weights; with LoRA (model.lora.r > 0) use rollout.engine=hf"
            )
        from rlx import distributed

        # Under torchrun every rank's engine joins the job's process group (external_launcher reads
        # torchrun's environment, as TRL's colocated mode); in a plain process vLLM's own one-process
        # executor, which puts itself on cuda:0.
        launcher = distributed.under_torchrun()
        device = policy.device
        if not launcher and device.index not in (None, 0):
            raise RlxError(
                f"rollout.engine=vllm in a plain process runs on cuda:0, the policy is on {device}: select "
                f"the GPU with CUDA_VISIBLE_DEVICES={device.index} and trainer.device=cuda"
            )
        # V1's engine core in this process, so that its model is reachable for the weight pushes
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM, SamplingParams  # lazily: GPU-only, not in rlx's default install

        self._sampling_params = SamplingParams
        self.policy = policy
        self.sleep = enable_sleep_mode
        self.asleep = False
        # vLLM starts from the policy's config with dummy weights; rlx pushes its own right after
        self._config_dir = tempfile.mkdtemp(prefix="rlx-vllm-config-")
        weakref.finalize(self, shutil.rmtree, self._config_dir, True)
        policy.model.config.save_pretrained(self._config_dir)
        dtype = str(next(policy.model.parameters()).dtype).removeprefix("torch.")
        self.llm = LLM(
            model=self._config_dir,
            load_format="dummy",
            skip_tokenizer_init=True,
            generation_config="vllm",  # vLLM's neutral defaults, not a generation_config.json
            dtype=dtype,
            tensor_parallel_size=1,
            **({"distributed_executor_backend": "external_launcher"} if launcher else {}),
            gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=enable_sleep_mode,
            max_model_len=max_model_len,
            enable_prefix_caching=True,  # the G copies of each prompt share their prefill
            seed=seed,
        )

    # -- weights -------------------------------------------------------------------------------
    def _model(self) -> Any:
        """vLLM's model in this process (V0, and V1 with its engine core in-process), or None."""
        try:
            return self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        except AttributeError:
            return None

    def _wake(self) -> None:
        if self.sleep and self.asleep:
            torch.cuda.empty_cache()
            self.llm.wake_up()
            self.asleep = False

    def load_weights(self, weights: Iterable[tuple[str, Tensor]], *, step: int) -> None:
        """The policy's tensors into vLLM's model by their transformers names (vLLM's ``load_weights``
        maps them to its fused layers), then vLLM's prefix cache is dropped (it holds old keys)."""
        self._wake()
        named = list(weights)
        model = self._model()
        if model is not None:
            model.load_weights(named)
        else:  # the worker reached through vLLM's collective RPC (same process under external_launcher)
            self.llm.collective_rpc(_load_weights_on_worker, args=(named,))
        self.llm.reset_prefix_cache()

    # -- sampling ------------------------------------------------------------------------------
    def generate(
        self, prompt_ids: Tensor, prompt_mask: Tensor, sampling: Sampling
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        max_new = int(sampling.max_new_tokens or self.policy.task.max_new_tokens)
        eos, pad = self.policy.eos_id, self.policy.pad_id
        params = self._sampling_params(**sampling_params_kwargs(sampling, max_new, eos))
        prompts = [
            {"prompt_token_ids": row[m.bool()].tolist()}
            for row, m in zip(prompt_ids.cpu(), prompt_mask.cpu(), strict=True)
        ]
        self._wake()
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        if self.sleep:
            self.llm.sleep(level=1)  # KV cache freed, weights to CPU memory while the update runs
            self.asleep = True
        completions = [list(o.outputs[0].token_ids) for o in outputs]
        stopped = [o.outputs[0].finish_reason == "stop" for o in outputs]
        tokens, mask = pad_completions(completions, stopped, max_new, eos, pad, prompt_ids.device)
        return tokens, mask, None


def _load_weights_on_worker(worker: Any, weights: list[tuple[str, Tensor]]) -> None:
    worker.model_runner.model.load_weights(weights)


@ENGINES.register("vllm")
def vllm_engine(policy: Policy, plan: Any) -> RolloutEngine:
    """vLLM colocated with this training process (``rollout.vllm_*`` settings)."""
    from rlx import distributed

    rank, _ = distributed.world()
    r = plan.rollout
    return VLLMEngine(
        policy,
        gpu_memory_utilization=r.vllm_gpu_memory_utilization,
        enable_sleep_mode=r.vllm_enable_sleep_mode,
        max_model_len=r.vllm_max_model_len,
        seed=plan.trainer.seed + rank,
    )
