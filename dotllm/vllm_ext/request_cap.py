"""`RequestCap`: the base of DotLLM's scheduler mixins that cap a request's new tokens.

vLLM 0.26's scheduler calls `_mamba_block_aligned_split` on both of its paths (running,
waiting) before it allocates a request's slots, where `need_mamba_block_aligned_split`
(a Mamba model's own split): the one place a mixin can give a request fewer tokens, or
none, for a step. Asked of every request every step, it cost ~0.6 us a request on the CI
machine's CPU (~160 us of the engine core's step at 256 decodes, on its critical path),
mostly for requests no mixin wanted to cap. So each step asks it of every request only
where some mixin wants it that step (`_cap_wanted`), or the model's own split does.
"""

from __future__ import annotations


class RequestCap:
    """Mixed in (through `CompileOverlap` or `DeviceStates`) before vLLM's scheduler."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._model_split = self.need_mamba_block_aligned_split  # vLLM's, for Mamba models

    def schedule(self, *args, **kwargs):
        self.need_mamba_block_aligned_split = self._cap_wanted()
        return super().schedule(*args, **kwargs)

    def _cap_wanted(self) -> bool:
        """Whether this step asks the cap of every request (a mixin adds its reasons)."""
        return self._model_split

    def _mamba_block_aligned_split(self, request, num_new_tokens: int, *args) -> int:
        if self._model_split:
            return super()._mamba_block_aligned_split(request, num_new_tokens, *args)
        return num_new_tokens
