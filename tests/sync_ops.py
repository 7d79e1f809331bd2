"""Record the aten ops that make a host wait for an accelerator (visible on CPU too, through the dispatcher)."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode


# `.item()` / `float()` / `bool()` on a tensor, and ops whose output shape depends on the data
SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.is_nonzero", "aten.unique")


class HostSyncRecorder(TorchDispatchMode):
    """Collects every dispatched op that would synchronise the host with a CUDA device: the ops above, and
    indexing or index assignment with a boolean mask (a hidden `nonzero`)."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(SYNC_OPS):
            self.syncs.append(name)
        elif name.startswith(("aten.index.", "aten.index_put", "aten._index_put_impl_")) and any(
            torch.is_tensor(i) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) if i is not None
        ):
            self.syncs.append(f"{name} (bool mask)")
        return func(*args, **(kwargs or {}))
