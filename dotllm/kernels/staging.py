"""A step's bitmask rows onto the logits' device without stalling the step.

vLLM builds a fresh [num_logits, W] tensor (pinned, filled with -1) every step and, in
its V2 runner, a fresh pinned index tensor too. Here the host buffers are pinned once
(grown when a step needs more rows) and only the constrained rows travel: written into
the pinned buffer, copied on a side stream while the compute stream is still busy with
the forward pass, and applied once the copy is done. Two events keep the reuse safe: a
host buffer is rewritten only after the copy that read it finished, and a device buffer
only after the kernel that read it finished.
"""

from __future__ import annotations

import numpy as np
import torch

from dotllm.kernels import implementation, kernel_name


class BitmaskStager:
    def __init__(self, device: torch.device, words: int, kernel: str = "auto",
                 initial_rows: int = 256):
        self.device = torch.device(device)
        self.words = words
        self.kernel = kernel_name(kernel, self.device)  # fails here, not mid-step
        self._apply = implementation(self.kernel, self.device.type)
        self._capacity = 0
        if self.device.type == "cuda":
            self._stream = torch.cuda.Stream(self.device)
            self._copied = torch.cuda.Event()
            self._consumed = torch.cuda.Event()
            self._grow(initial_rows)

    def _grow(self, rows: int) -> None:
        if self._capacity:  # buffers in flight are about to be dropped: let them finish
            torch.cuda.current_stream(self.device).synchronize()
            self._stream.synchronize()
        self._capacity = max(rows, 2 * self._capacity)
        self._host_masks = torch.empty((self._capacity, self.words), dtype=torch.int32,
                                       pin_memory=True)
        self._host_rows = torch.empty(self._capacity, dtype=torch.int32, pin_memory=True)
        self._host_masks_np = self._host_masks.numpy()
        self._host_rows_np = self._host_rows.numpy()
        self._device_masks = torch.empty_like(self._host_masks, device=self.device)
        self._device_rows = torch.empty_like(self._host_rows, device=self.device)

    def apply(self, logits: torch.Tensor, masks: np.ndarray, logit_rows: np.ndarray) -> None:
        """Mask logits[logit_rows[i]] with masks[i] (np.int32 [R, W]), in place."""
        count = len(logit_rows)
        if count == 0:
            return
        if self.device.type != "cuda":
            self._apply(logits, torch.from_numpy(masks),
                        torch.from_numpy(np.asarray(logit_rows, dtype=np.int32)), None)
            return
        if count > self._capacity:
            self._grow(count)
        self._copied.synchronize()  # the previous copy has read the host buffers
        self._host_masks_np[:count] = masks
        self._host_rows_np[:count] = logit_rows
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(self._consumed)  # the previous kernel has read them
            device_masks = self._device_masks[:count]
            device_rows = self._device_rows[:count]
            device_masks.copy_(self._host_masks[:count], non_blocking=True)
            device_rows.copy_(self._host_rows[:count], non_blocking=True)
            self._copied.record(self._stream)
        compute.wait_event(self._copied)
        self._apply(logits, device_masks, device_rows, None)
        self._consumed.record(compute)
