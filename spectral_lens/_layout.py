"""Which module outputs are channels-first (``(N, C, *spatial)``: convolutions, batch/instance/group
norms, pooling, upsampling, padding), so a capture that reads rows along the last dimension would silently
measure the wrong axis. :func:`channels_first` is decided once when a hook is registered (most
modules: ``None``, nothing to check per call); :func:`refuse_channels_first` checks one output.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

# modules whose output has its channels before a fixed number of spatial dims (None: the digit ending the
# class name, MaxPool2d -> 2)
_FIXED = (
    (nn.modules.conv._ConvNd, lambda m: len(m.kernel_size)),
    (nn.modules.pooling._MaxPoolNd, None), (nn.modules.pooling._AvgPoolNd, None),
    (nn.modules.pooling._AdaptiveMaxPoolNd, None), (nn.modules.pooling._AdaptiveAvgPoolNd, None),
    (nn.modules.pooling._LPPoolNd, None), (nn.modules.pooling._MaxUnpoolNd, None),
    (nn.FractionalMaxPool2d, 2), (nn.FractionalMaxPool3d, 3),
    (nn.BatchNorm2d, 2), (nn.BatchNorm3d, 3), (nn.LazyBatchNorm2d, 2), (nn.LazyBatchNorm3d, 3),
    (nn.modules.instancenorm._InstanceNorm, None),
    (nn.Dropout1d, 1), (nn.Dropout2d, 2), (nn.Dropout3d, 3),
    (nn.PixelShuffle, 2), (nn.PixelUnshuffle, 2), (nn.ChannelShuffle, 2),
    (nn.modules.padding._ConstantPadNd, None), (nn.modules.padding._ReflectionPadNd, None),  # ZeroPad2d, ...
    (nn.modules.padding._ReplicationPadNd, None), (nn.modules.padding._CircularPadNd, None),
)
# channels-first only with spatial dims: (N, C) is rows of C features, (N, C, L, ...) is not
_BATCHED = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.Upsample)


def _rank(module: nn.Module) -> tuple[bool, int | None] | None:
    """``(fixed, spatial_rank)`` of a channels-first module type, or ``None`` for any other module."""
    for cls, rank in _FIXED:
        if isinstance(module, cls):
            # pooling/instance norm: the class name ends in the rank ("MaxPool2d", "InstanceNorm1d")
            if rank is None:
                digit = type(module).__name__.rstrip("d")[-1:]
                return (True, int(digit)) if digit.isdigit() else (False, None)
            return True, rank(module) if callable(rank) else rank
    # a norm that says so: Hugging Face's ConvNextLayerNorm (data_format="channels_first"), SAM's, ...
    if isinstance(module, _BATCHED) or getattr(module, "data_format", None) == "channels_first":
        return False, None
    return None


def _size(module: nn.Module, attrs: tuple[str, ...]) -> int | None:
    for attr in attrs:
        value = getattr(module, attr, None)
        value = value[-1] if isinstance(value, (tuple, list)) and value else value
        if isinstance(value, int) and value > 0:
            return value
    return None


def _channels(module: nn.Module) -> int | None:
    """The channel count of a channels-first module's output, when the module knows it."""
    return _size(module, ("out_channels", "num_features", "num_channels", "normalized_shape"))


# modules whose output is ``(..., width)``, features last, unless a subclass permutes after (timm's LayerNorm2d)
_LAST = (nn.Linear, nn.LayerNorm, nn.RMSNorm)


def _hf_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and type(module).__module__ == "transformers.pytorch_utils"


def _width(module: nn.Module) -> int | None:
    """The feature count of a channels-last Linear or LayerNorm / RMSNorm output, or of Hugging Face's
    ``Conv1D`` (GPT-2's Linear)."""
    if _hf_conv1d(module):
        return _size(module, ("nf",))
    if not isinstance(module, _LAST) or _rank(module) is not None:
        return None
    return _size(module, ("out_features", "normalized_shape"))


def _sized(module: nn.Module) -> int | None:
    """The size of ``module``'s output features: a channels-first module's channels, a Linear's or
    LayerNorm's width; ``None`` for any other module (pooling, activations (torch's, Hugging Face's
    ``transformers.activations``), dropout, custom modules)."""
    return _channels(module) if _rank(module) is not None else _width(module)


def _backwards(module: nn.Module):
    """``module``'s modules from the one registered last: known layers whole, other containers opened."""
    for child in reversed(list(module.children())):
        if _rank(child) is None and _width(child) is None and next(child.children(), None) is not None:
            yield from _backwards(child)
        else:
            yield child


def _last_sized(module: nn.Module) -> nn.Module | None:
    """The module registered last in ``module`` whose output size is known (a conv, a norm, a Linear), past
    any others (activations, dropout, pooling, a custom activation or permute module): the module whose
    output a block most likely returns, perhaps permuted back to channels first (ConvNeXt's Linear,
    Wav2Vec2's transposed LayerNorm)."""
    return next((m for m in _backwards(module) if _sized(m) is not None), None)


class Layout(NamedTuple):
    """What :func:`channels_first` found, decided once per hook: the module whose output size is known,
    whether the output is certainly its (``direct``), its ``_rank``, its size, and the block's widths."""

    module: nn.Module
    direct: bool
    fixed: bool
    rank: int | None
    channels: int | None
    widths: frozenset


def channels_first(module: nn.Module) -> Layout | None:
    """The :class:`Layout` of ``module``'s output when it may be channels-first: the module is a
    convolution, batch/instance/group norm, pooling or upsampling layer, or a norm with
    ``data_format="channels_first"`` (``direct``: certain), or a container (an ``nn.Sequential``, a
    ResNet or ConvNeXt block) or a Linear/LayerNorm subclass, whose last module of known size (past
    activations, pooling and modules of unknown size) is given with the feature widths of the Linear
    and LayerNorm layers in it (``widths``; a container's last Linear/LayerNorm only where it also holds a
    channels-first module of that size or of unknown size: ConvNeXt, Wav2Vec2); not ``direct``, the shape
    decides per output, see :func:`refuse_channels_first`. ``None`` otherwise: nn.Linear, nn.LayerNorm,
    Embedding, Hugging Face's channels-last ``Conv1D``, and containers without a module of known size."""
    if _rank(module) is not None:
        return Layout(module, True, *_rank(module), _channels(module), frozenset())
    if type(module) in _LAST or _hf_conv1d(module):  # their output's last dim is their width: features last
        return None
    leaf = _last_sized(module) if _width(module) is None else module
    if leaf is None:
        return None
    if leaf is not module and _rank(leaf) is None and not any(
            _rank(m) is not None and _channels(m) in (None, _width(leaf)) for m in module.modules()):
        # a block ending in a Linear/LayerNorm with no channels-first module of that size (or of unknown size)
        # in it had nothing channels-first to permute back to: its output is read as it is (an MoE block whose
        # router Linear is its last sized module, at T == the expert count; a Linear then an LSTM)
        return None
    widths = frozenset(w for w in map(_width, module.modules()) if w is not None)
    return Layout(leaf, False, *(_rank(leaf) or (False, None)), _sized(leaf), widths)


def refuse_channels_first(layout: Layout, output, where: str, *, chosen: bool = False) -> None:
    """``TypeError`` naming ``where`` when ``output`` (the tensor a hook would read as rows of its last
    dimension) is the channels-first output ``layout`` describes, with the ``pick=`` that measures it
    as rows of channels. A container's output must show its last sized module's size at the channel
    dimension and, last, a size that is neither that one nor the width of a Linear or LayerNorm in it
    (a block that transposes back to channels-last, or returns the features of its LayerNorm, passes).
    ``chosen``: ``SpectralLens`` chose the block itself (``layers=None`` or ``"all"``)."""
    module, direct, fixed, rank, channels, widths = layout
    ndim = output.dim()
    if fixed:
        channel_dim = ndim - rank - 1  # unbatched inputs (C, L) included
        if channel_dim < 0 or rank == 0:
            return
    else:
        if ndim < 3:  # (N, C): rows of C features already
            return
        channel_dim = 1
    shape = output.shape
    if not direct and (shape[channel_dim] != channels or shape[-1] == channels or shape[-1] in widths):
        return
    shape = tuple(shape)
    c = shape[channel_dim]
    if direct:
        what = ""
    elif _rank(module) is not None:
        what = f" (its last module of known size is a channels-first {type(module).__name__})"
    else:
        what = (f" (its last module of known size is a {type(module).__name__} of {channels} features, "
                f"which this output holds at dim {channel_dim}, not last: permuted back to channels first)")
    lens = (" SpectralLens chose this block itself (layers=None or 'all'): for a convolutional network pass "
            "layers= naming the block to measure (e.g. the last stage's last block) with that pick=." if chosen else "")
    # a block's layout is a guess; pooling or upsampling may run over the features of (N, T, d) rows, and a
    # kernel-1 Conv1d may mix the positions of (N, T, d) rows as its channels (gMLP's, MLP-Mixer's token mixing)
    token_mixing = isinstance(module, nn.Conv1d) and tuple(module.kernel_size) == (1,)
    escape = ("" if direct and channels is not None and not token_mixing else " If this output is channels-last "
              "already (features last), pass pick=lambda out: out to read it as it is.")
    raise TypeError(
        f"{where}: the module output{what} is channels-first, shape {shape} with {c} channels at dim "
        f"{channel_dim}, but rows are read along the last dimension ({output.numel() // max(shape[-1], 1)} rows "
        f"of width {shape[-1]}, a spectrum of the wrong axis); measure the channels with "
        f"pick=lambda out: out.movedim({channel_dim}, -1) ({output.numel() // max(c, 1)} rows of {c} channels, "
        f"one per sample and position; pick= of attach or SpectralLens), or pool the positions first, e.g. "
        f"pick=lambda out: out.flatten({channel_dim + 1}).mean(-1).{lens}{escape}"
    )
