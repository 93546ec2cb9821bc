"""``Attachment``: the handle ``attach(model)`` returns for pieces that bind to a model without hooks.

:meth:`PerSampleGradientProbe.attach <spectral_lens.PerSampleGradientProbe.attach>` and
:meth:`SpectralLens.attach <spectral_lens.SpectralLens.attach>` bind their owner to a model (resolve
names, choose engines); hooks exist only while they measure. The handle unbinds the owner again.
(Accumulators, which do hook the model, return an :class:`~spectral_lens.ActivationCapture`: the
same context-manager shape with ``remove()``.) :func:`attach_once` is their shared ``attach``.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

from torch import nn

from .capture import unwrap_compiled

__all__ = ["Attachment", "attach_once"]


class Attachment:
    """Handle of one ``owner.attach(model)``: ``remove()`` calls ``owner.detach()``.

    A context manager (leaving the block removes it, also on an exception). ``remove()`` is
    idempotent, and a stale handle's ``remove()`` does nothing: once the owner was detached and
    attached again (to any model, the same one included), only the newest handle unbinds it.
    The handle refers to the model weakly: the owner keeps its current handle, so a model deleted
    after ``owner.detach()`` (or after training with a callback) is freed.
    """

    def __init__(self, owner: Any, model: nn.Module) -> None:
        self.owner, self._model = owner, weakref.ref(model)
        owner._attachment = self  # the owner's current handle; an older one is stale

    def __getstate__(self) -> dict[str, Any]:
        # pickle / copy.deepcopy (a model keeping its lens or probe as an attribute is saved whole): a
        # weak reference cannot be pickled, and deep-copied it would still point at the original model
        return {"owner": self.owner, "model": self.model}

    def __setstate__(self, state: dict[str, Any]) -> None:
        model = state["model"]
        self.owner, self._model = state["owner"], None if model is None else weakref.ref(model)

    @property
    def model(self) -> nn.Module | None:
        """The model of this attach; ``None`` once removed or once the model was freed."""
        return None if self._model is None else self._model()

    @property
    def active(self) -> bool:
        """Whether the owner is still bound to this handle's model by this handle's attach."""
        current = getattr(self.owner, "_attachment", None) is self
        return current and self.model is not None and self.owner.model is self.model

    def remove(self) -> None:
        """Unbind the owner from the model (once)."""
        if self.active:
            self.owner.detach()
        self._model = None

    def __enter__(self) -> "Attachment":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"Attachment({type(self.owner).__name__}, active={self.active})"


def attach_once(owner: Any, model: nn.Module, *, elsewhere: Callable[[nn.Module], str],
                again: Callable[[nn.Module], str]) -> Attachment:
    """``owner.attach(model)`` for an owner with ``model`` and ``_bind``: bind it to ``model`` (a ``torch.compile``
    wrapper unwrapped, as ``_bind`` does) and return its new handle. An owner bound already raises ``ValueError``
    with the owner's own message, ``elsewhere(current_model)`` when bound to another model, ``again(model)`` to
    this one: attaching again would drop what the owner holds for it. A refused bind leaves the owner unbound
    (``owner.detach()``): ``_bind`` may have set part of its state, and a half-bound owner without a handle
    refused every later attach as "attached to another" model. A parallel wrapper (DDP, DataParallel, a DeepSpeed
    engine) is refused first, as ``_bind`` refuses it: an owner bound to ``wrapper.module`` said "attached to
    another" model for the same model wrapped."""
    # imported here: the gradients package imports this module
    from .gradients._measurable import refuse_parallel_wrapper

    model = unwrap_compiled(model)
    refuse_parallel_wrapper(model, type(owner).__name__)
    if owner.model is not None:
        raise ValueError(elsewhere(owner.model) if owner.model is not model else again(model))
    try:
        owner._bind(model)
    except BaseException:
        owner.detach()
        raise
    return Attachment(owner, model)
