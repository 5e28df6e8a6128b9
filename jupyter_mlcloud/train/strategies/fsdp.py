"""``--strategy fsdp``: FSDP2 ``fully_shard`` on GPUs (NCCL); state gathered whole for commits."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from .base import Strategy, _no_pipeline_args


class FSDPStrategy(Strategy):
    """FSDP2: each block and the root ``fully_shard``-ed; state gathered whole for commits."""

    replicated_state = False  # gathered to rank 0 only

    collective_state = True

    def wrap(self, model: Any, optimizer: Any, *, split: Sequence[str] | None,
             loss_fn: Any) -> Any:
        from torch.distributed.fsdp import fully_shard

        _no_pipeline_args(self.options.name, split, loss_fn)
        names = {id(p): n for n, p in model.named_parameters()}
        self._original = copy.deepcopy(model).to("cpu") if self.rank == 0 else None
        for child in model.children():
            if any(True for _ in child.parameters()):
                fully_shard(child)
        fully_shard(model)
        if optimizer is not None:  # it was built on the unsharded parameters: point it anew
            now = dict(model.named_parameters())
            for group in optimizer.param_groups:
                group["params"] = [now[names[id(p)]] for p in group["params"]]
            optimizer.state.clear()
        self._model, self._optimizer = model, optimizer
        self.wrapped.append(model)
        return model

    def _options(self) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def model_states(self, models: list[Any]) -> list[dict[str, Any]]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return [get_model_state_dict(m, options=self._options()) for m in models]

    def optimizer_states(self, optimizers: list[Any]) -> list[dict[str, Any]]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return [get_optimizer_state_dict(self._model, o, options=self._options())
                for o in optimizers]

    def load_states(self, models: list[Any], model_states: list[dict[str, Any]],
                    optimizers: list[Any], optimizer_states: list[dict[str, Any]]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        whole = StateDictOptions(full_state_dict=True)  # every rank got the whole state
        for model, saved in zip(models, model_states, strict=False):
            set_model_state_dict(model, saved, options=whole)
        for optimizer, saved in zip(optimizers, optimizer_states, strict=True):
            set_optimizer_state_dict(self._model, optimizer, saved, options=whole)

    def finish(self) -> None:
        states = self.model_states([self._model])
        if self._original is not None:
            self._original.load_state_dict(states[0])

    def export(self, value: Any) -> Any:
        return self._original if value is self._model else value

    def release(self) -> None:
        super().release()
        self._model = self._optimizer = self._original = None
