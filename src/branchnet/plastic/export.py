"""Hand trained masks to PyTorch: ``torch.nn.utils.prune`` form, or CSR ``Linear`` layers.

- :func:`to_torch_prune` registers every mask with ``prune.custom_from_mask`` (the weight
  becomes ``<name>_orig`` × ``<name>_mask`` through a forward pre-hook); :func:`remove_prune`
  makes the masked weights plain parameters again.
- :func:`to_csr` replaces masked ``nn.Linear`` layers by :class:`CSRLinear` (a
  ``torch.sparse_csr_tensor`` weight; inference only, no gradient). Convolutions and every other
  masked weight stay dense (masked): PyTorch has no sparse CPU convolution, and CSR beats a
  dense matmul only from ≈ 90 % sparsity (REFERENCE 4.8).

Example:
    >>> import torch
    >>> from branchnet.plastic.masks import SparseMasks
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> masks = SparseMasks.from_model(net, 0.25)
    >>> masks.apply(net)
    >>> fast = to_csr(net, masks)
    >>> type(fast[0]).__name__
    'CSRLinear'
    >>> x = torch.randn(3, 8)
    >>> torch.allclose(fast(x), net(x), atol=1e-6)
    True
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.nn.utils import prune

from branchnet.plastic.masks import SparseMasks, SparsityError


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    mod_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(mod_name) if mod_name else model
    except AttributeError as e:
        raise SparsityError(f"{type(model).__name__} has no module {mod_name!r} (mask {name!r})") from e
    if not isinstance(getattr(module, attr, None), torch.Tensor):
        raise SparsityError(f"{type(model).__name__}.{mod_name or '<root>'} has no tensor {attr!r}")
    return module, attr


def to_torch_prune(model: nn.Module, masks: SparseMasks) -> nn.Module:
    """Apply ``masks`` in place as ``torch.nn.utils.prune.custom_from_mask`` (returns ``model``).

    Parameter names change (``0.weight`` -> ``0.weight_orig`` plus a ``0.weight_mask``
    buffer) until :func:`remove_prune`.

    >>> net = torch.nn.Linear(4, 2)
    >>> m = SparseMasks({"weight": torch.eye(2, 4, dtype=torch.bool)})
    >>> _ = to_torch_prune(net, m)
    >>> sorted(n for n, _ in net.named_buffers()), int((net.weight != 0).sum())
    (['weight_mask'], 2)
    """
    for name, mask in masks.items():
        module, attr = _owner(model, name)
        prune.custom_from_mask(module, attr, mask.to(getattr(module, attr).device))
    return model


def remove_prune(model: nn.Module) -> nn.Module:
    """Make every pruned tensor of ``model`` a plain parameter again (``prune.remove``), with its
    masked values; returns ``model``.

    >>> net = to_torch_prune(torch.nn.Linear(4, 2), SparseMasks({"weight": torch.ones(2, 4).bool()}))
    >>> sorted(n for n, _ in remove_prune(net).named_parameters())
    ['bias', 'weight']
    """
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
    return model


class CSRLinear(nn.Module):
    """An inference-only ``Linear`` with a CSR weight: ``y = x W^T + b`` for inputs ``(..., in)``.

    >>> lin = torch.nn.Linear(3, 2)
    >>> csr = CSRLinear.from_linear(lin, torch.ones(2, 3, dtype=torch.bool))
    >>> torch.allclose(csr(torch.ones(4, 3)), lin(torch.ones(4, 3)))
    True
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if weight.ndim != 2:
            raise SparsityError(f"CSRLinear needs a 2-D weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            csr = weight.detach().to_sparse_csr()
        self.register_buffer("weight", csr)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor | None = None) -> CSRLinear:
        """The CSR form of ``linear`` with ``mask`` applied (zeros are never stored)."""
        w = linear.weight.detach()
        if mask is not None:
            w = w * mask.to(w.device)
        return cls(w, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise SparsityError(f"CSRLinear expects inputs (..., {self.in_features}), got {tuple(x.shape)}")
        flat = x.reshape(-1, self.in_features)
        # (out, in) CSR @ (in, B) dense -> (out, B): the sparse operand must come first
        y = torch.sparse.mm(self.weight, flat.t().contiguous()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        nnz = self.weight._nnz()
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"nnz={nnz}, density={nnz / (self.in_features * self.out_features):.4f}")

    def to_dense_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the same outputs."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.weight.to_dense())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin


def to_csr(model: nn.Module, masks: SparseMasks, inplace: bool = False) -> nn.Module:
    """``model`` (a deep copy unless ``inplace``) with every masked ``nn.Linear`` replaced by
    :class:`CSRLinear`; other masked weights (convolutions, virtual blocks, a bare ``nn.Linear``
    as the root module) are only masked.
    For inference: call ``.eval()``; CSR weights take no gradient."""
    out = model if inplace else copy.deepcopy(model)
    for name, mask in masks.items():
        module, attr = _owner(out, name)
        mod_name = name.rpartition(".")[0]
        if type(module) is nn.Linear and attr == "weight" and mod_name:
            parent_name, _, child = mod_name.rpartition(".")
            parent = out.get_submodule(parent_name) if parent_name else out
            setattr(parent, child, CSRLinear.from_linear(module, mask))
        else:
            with torch.no_grad():
                getattr(module, attr).mul_(mask.to(getattr(module, attr).device))
    return out


__all__ = ["CSRLinear", "remove_prune", "to_csr", "to_torch_prune"]
