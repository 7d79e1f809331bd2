"""Gated forward hooks that capture the output of chosen decoder layers.

Hooks record what the host trainer computes anyway: no extra forward pass, and only the needed layers are kept
alive (``output_hidden_states=True`` would keep all of them). Recording happens only inside ``capture()``, so the
same layers running during ``generate`` (GKD on-policy, ``seq_kd``) are ignored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP / DeepSpeed engines keep the real model in `.module`; PEFT models expose `get_base_model()`.
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """Return the list of decoder blocks of a causal LM (Llama/Qwen2 `.layers`, GPT-2 `.h`, PEFT, DDP)."""
    model = _unwrap(model)
    candidates = []
    if hasattr(model, "get_decoder"):
        with contextlib.suppress(Exception):
            candidates.append(model.get_decoder())
    candidates += [model, getattr(model, "model", None), getattr(model, "transformer", None)]
    for cand in candidates:
        if cand is None:
            continue
        for name in ("layers", "h", "blocks"):
            layers = getattr(cand, name, None)
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                return layers
    raise ValueError(
        f"Could not find the decoder layers of {type(model).__name__}: expected a `.layers` or `.h` ModuleList "
        "under `model.get_decoder()`. Feature distillation supports decoder-only causal LMs."
    )


def num_decoder_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def resolve_layer_index(index: int, num_layers: int, who: str) -> int:
    """Turn a possibly negative layer index into a positive one, or raise a clear error."""
    if not -num_layers <= index < num_layers:
        raise ValueError(
            f"{who} layer index {index} is out of range: the {who} has {num_layers} decoder layers "
            f"(valid indices are 0..{num_layers - 1}, or -1..-{num_layers} counted from the end)."
        )
    return index % num_layers


class LayerTap:
    """Forward hooks on some decoder layers of one model, recording their outputs inside `capture()`.

    Args:
        model: the causal LM (plain, PEFT-wrapped or accelerate-wrapped).
        layers: positive decoder-layer indices to tap.
        gather: optional `{layer: LongTensor}` of unit indices; only those units are kept (teacher side), which
            frees the full hidden state as soon as the next layer has run.
        detach: store detached tensors (teacher side) or keep the autograd graph (student side).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[int],
        gather: dict[int, torch.Tensor] | None = None,
        detach: bool = False,
    ):
        self.layers = list(dict.fromkeys(layers))
        self.gather = gather or {}
        self.detach = detach
        self.active = False
        self.outputs: dict[int, torch.Tensor] = {}
        blocks = decoder_layers(model)
        self._handles = [blocks[i].register_forward_hook(self._make_hook(i)) for i in self.layers]

    def _make_hook(self, layer: int):
        def hook(module, args, output):
            if not self.active:
                return
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            if self.detach:
                hidden = hidden.detach()
            index = self.gather.get(layer)
            if index is not None:
                # (B, T, k): only the selected teacher units
                hidden = hidden.index_select(-1, index.to(hidden.device))
            self.outputs[layer] = hidden
            return

        return hook

    @contextlib.contextmanager
    def capture(self):
        """Record layer outputs for the duration of the block; the dict is cleared on entry."""
        self.outputs = {}
        self.active = True
        try:
            yield self.outputs
        finally:
            self.active = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
