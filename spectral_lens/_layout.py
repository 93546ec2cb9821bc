"""Which module outputs are channels-first (``(N, C, *spatial)``: convolutions, batch/instance/group
norms, pooling, upsampling), so a capture that reads rows along the last dimension would silently
measure the wrong axis. :func:`channels_first` is decided once when a hook is registered (most
modules: ``None``, nothing to check per call); :func:`refuse_channels_first` checks one output.
"""

from __future__ import annotations

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
)
# channels-first only with spatial dims: (N, C) is rows of C features, (N, C, L, ...) is not
_BATCHED = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.Upsample)
# shape-preserving elementwise modules that may follow the channels-first one at the end of a block
_ELEMENTWISE = (nn.Identity, nn.modules.dropout._DropoutNd, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish,
                nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
                nn.PReLU, nn.Softplus, nn.Hardtanh)


def _rank(module: nn.Module) -> tuple[bool, int | None] | None:
    """``(fixed, spatial_rank)`` of a channels-first module type, or ``None`` for any other module."""
    for cls, rank in _FIXED:
        if isinstance(module, cls):
            # pooling/instance norm: the class name ends in the rank ("MaxPool2d", "InstanceNorm1d")
            if rank is None:
                digit = type(module).__name__.rstrip("d")[-1:]
                return (True, int(digit)) if digit.isdigit() else (False, None)
            return True, rank(module) if callable(rank) else rank
    if isinstance(module, _BATCHED):
        return False, None
    return None


def _channels(module: nn.Module) -> int | None:
    """The channel count of a channels-first module's output, when the module knows it."""
    for attr in ("out_channels", "num_features", "num_channels"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _elementwise(module: nn.Module) -> bool:
    """torch's activations and dropout, and Hugging Face's activation modules (``transformers.activations``:
    ``GELUActivation``, ``NewGELUActivation``..., which Wav2Vec2's and Whisper's conv blocks end in)."""
    return isinstance(module, _ELEMENTWISE) or type(module).__module__ == "transformers.activations"


def _last_leaf(module: nn.Module) -> nn.Module | None:
    """The module registered last in ``module`` (past trailing elementwise ones such as a ReLU), looked
    for in the last child container: the module whose output a block most likely returns."""
    for child in reversed(list(module.children())):
        if _elementwise(child):
            continue
        if _rank(child) is not None:
            return child
        return _last_leaf(child) if next(child.children(), None) is not None else None
    return None


def channels_first(module: nn.Module) -> tuple[nn.Module, bool] | None:
    """``(channels-first module, direct)`` when ``module``'s output is likely channels-first: the module
    is a convolution, batch/instance/group norm, pooling or upsampling layer (``direct``: certain), or a
    container (an ``nn.Sequential``, a ResNet block) whose last registered module (past elementwise
    activations) is one (not ``direct``: confirmed per output by the shape, see
    :func:`refuse_channels_first`). ``None`` otherwise: Linear, LayerNorm, Embedding, Hugging Face's
    channels-last ``Conv1D``, and blocks that end in one of those."""
    if _rank(module) is not None:
        return module, True
    leaf = _last_leaf(module)
    return (leaf, False) if leaf is not None and _channels(leaf) is not None else None


def refuse_channels_first(layout: tuple[nn.Module, bool], output, where: str, *, chosen: bool = False) -> None:
    """``TypeError`` naming ``where`` when ``output`` (the tensor a hook would read as rows of its last
    dimension) is the channels-first output ``layout`` describes, with the ``pick=`` that measures it
    as rows of channels. A container's output must show the last module's channel count at the
    channel dimension and another size last (a block that transposes back to channels-last passes).
    ``chosen``: ``SpectralLens`` chose the block itself (``layers=None`` or ``"all"``)."""
    module, direct = layout
    fixed, rank = _rank(module)
    ndim = output.dim()
    if fixed:
        channel_dim = ndim - rank - 1  # unbatched inputs (C, L) included
        if channel_dim < 0 or rank == 0:
            return
    else:
        if ndim < 3:  # (N, C): rows of C features already
            return
        channel_dim = 1
    channels = _channels(module)
    shape = tuple(output.shape)
    if not direct and (shape[channel_dim] != channels or shape[-1] == channels):
        return
    c = shape[channel_dim]
    what = "" if direct else f" (its last module is a channels-first {type(module).__name__})"
    lens = (" SpectralLens chose this block itself (layers=None or 'all'): for a convolutional network pass "
            "layers= naming the block to measure (e.g. the last stage's last block) with that pick=." if chosen else "")
    # a block's layout is a guess, and pooling or upsampling may run over the features of (N, T, d) rows
    escape = ("" if direct and channels is not None else " If this output is channels-last already (features "
              "last), pass pick=lambda out: out to read it as it is.")
    raise TypeError(
        f"{where}: the module output{what} is channels-first, shape {shape} with {c} channels at dim "
        f"{channel_dim}, but rows are read along the last dimension ({output.numel() // max(shape[-1], 1)} rows "
        f"of width {shape[-1]}, a spectrum of the wrong axis); measure the channels with "
        f"pick=lambda out: out.movedim({channel_dim}, -1) ({output.numel() // max(c, 1)} rows of {c} channels, "
        f"one per sample and position; pick= of attach or SpectralLens), or pool the positions first, e.g. "
        f"pick=lambda out: out.flatten({channel_dim + 1}).mean(-1).{lens}{escape}"
    )
