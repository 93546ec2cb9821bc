"""Adversarial review of ``all_blocks``'s ``config.num_hidden_layers`` rule (merge 06abbc0): where the config
counts something other than the stack, the stack chosen is the one chosen before the rule (the longest
homogeneous list no other contains); a hybrid stack the config counts still wins (Zamba2).

Built without ``transformers`` where the shape alone matters: a class named ``PretrainedConfig`` stands for a
``transformers`` config (the rule recognises one by class name, without importing ``transformers``)."""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import pytest
from torch import nn

from spectral_lens.lens import all_blocks, deepest_block


class PretrainedConfig(SimpleNamespace):
    """Stands for ``transformers.PretrainedConfig`` (same class name)."""


class SelfAttn(nn.Module):
    def __init__(self):
        super().__init__()
        self.o, self.norm = nn.Linear(8, 8), nn.LayerNorm(8)


class FF(nn.Module):
    def __init__(self):
        super().__init__()
        self.wi, self.wo = nn.Linear(8, 16), nn.Linear(16, 8)


class T5LikeBlock(nn.Module):
    """A T5 block: its sublayers in a ``ModuleList`` of two classes (self-attention, feed-forward)."""

    def __init__(self):
        super().__init__()
        self.layer = nn.ModuleList([SelfAttn(), FF()])


class T5LikeEncoder(nn.Module):
    def __init__(self, n_blocks: int, config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(11, 8)
        self.block = nn.ModuleList(T5LikeBlock() for _ in range(n_blocks))


@pytest.mark.parametrize("n_blocks", [3, 4])
def test_a_list_inside_a_homogeneous_stack_is_never_the_configured_stack(n_blocks):
    """The config says 2 layers, the stack has 3 or 4 (grown or truncated without updating the config, as
    layer-pruning and depth-upscaling code does): each block's list of 2 sublayers is as long as the config
    says, yet it is a list inside a block, not the stack (the merged rule took ``block.0.layer``)."""
    model = T5LikeEncoder(n_blocks, PretrainedConfig(num_hidden_layers=2))
    assert all_blocks(model) == [f"block.{i}" for i in range(n_blocks)]
    assert deepest_block(model) == f"block.{n_blocks - 1}"


@dataclasses.dataclass
class MyConfig:
    num_hidden_layers: int = 2  # the hidden layers of the classifier's MLP head, not the transformer's


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.mlp = nn.Linear(8, 8), nn.Linear(8, 8)


class UserModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(Block() for _ in range(4))
        self.head = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(config.num_hidden_layers))


@pytest.mark.parametrize("config", [MyConfig(), SimpleNamespace(num_hidden_layers=2)])
def test_only_a_transformers_config_counts_the_stack(config):
    """A user model's own config (a dataclass, a namespace) may call anything ``num_hidden_layers`` (here the
    MLP head's): it is scored as before the rule, the longest stack (the merged rule took the head)."""
    assert all_blocks(UserModel(config)) == [f"blocks.{i}" for i in range(4)]


def test_a_dict_config_is_ignored():
    model = UserModel(MyConfig())
    model.config = {"num_hidden_layers": 2}
    assert all_blocks(model) == [f"blocks.{i}" for i in range(4)]


def test_a_transformers_config_still_picks_a_hybrid_stack_when_wrapped():
    """The hybrid stack (two classes, a homogeneous list of adapters inside one) counted by the config wins,
    also with the config reached through a wrapper's attribute forwarding (PEFT's ``PeftModel``)."""

    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.out_proj = nn.LayerNorm(8), nn.Linear(8, 8)

    class Hybrid(nn.Module):
        def __init__(self):
            super().__init__()
            self.adapters = nn.ModuleList(nn.Sequential(nn.Linear(8, 2), nn.Linear(2, 8)) for _ in range(3))

    class HybridLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = PretrainedConfig(num_hidden_layers=4)
            self.layers = nn.ModuleList([Mixer(), Hybrid(), Mixer(), Hybrid()])

    class Wrapper(nn.Module):  # forwards unknown attributes to the model it wraps, as PeftModel does
        def __init__(self, model):
            super().__init__()
            self.base_model = model

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.base_model, name)

    assert all_blocks(HybridLM()) == [f"layers.{i}" for i in range(4)]
    assert all_blocks(Wrapper(HybridLM())) == [f"base_model.layers.{i}" for i in range(4)]


def test_transformers_t5_grown_without_updating_its_config():
    """The same with ``transformers``' T5 encoder, a block appended (``config.num_layers`` still 2)."""
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
    config = transformers.T5Config(vocab_size=11, d_model=8, d_ff=16, d_kv=4, num_layers=2, num_heads=2)
    model = transformers.T5EncoderModel(config)
    model.encoder.block.append(copy.deepcopy(model.encoder.block[1]))
    assert all_blocks(model) == [f"encoder.block.{i}" for i in range(3)]


@pytest.mark.parametrize("encoder, decoder", [(2, 3), (3, 2)])
def test_transformers_encoder_decoder_takes_the_stack_its_config_counts(encoder, decoder):
    """An encoder-decoder's ``num_hidden_layers`` counts its encoder's layers: the encoder's stack whichever is
    longer (before the rule: the longer one, the encoder when as long), as documented in docs/lens.md."""
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
    config = transformers.T5Config(vocab_size=11, d_model=8, d_ff=16, d_kv=4, num_layers=encoder,
                                   num_decoder_layers=decoder, num_heads=2)
    model = transformers.T5ForConditionalGeneration(config)
    assert all_blocks(model) == [f"encoder.block.{i}" for i in range(encoder)]


@pytest.mark.parametrize("as_long", [False, True])
def test_a_multimodal_model_takes_its_language_model_not_a_vision_tower(as_long):
    """A Llava-style model: the root config has no ``num_hidden_layers``, its text config counts the language
    model's 2 layers; the vision tower's 3 layers are longer (before: the vision tower, the default probe then
    being a SigLIP/CLIP layer, as for PaliGemma's real 18 Gemma and 27 SigLIP layers). A tower or Q-Former as
    long as the language model, registered first, is not taken either: the stack lies in the module built
    from the text config (BLIP-2's default OPT and Q-Former both have 12 layers)."""

    class TextConfig(PretrainedConfig):
        pass

    class MultimodalConfig(PretrainedConfig):
        def get_text_config(self):
            return self.text_config

    class Tower(nn.Module):
        def __init__(self, n, config=None):
            super().__init__()
            self.config = config
            self.layers = nn.ModuleList(Block() for _ in range(n))

    class VLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = MultimodalConfig(text_config=TextConfig(num_hidden_layers=2))
            self.vision_tower = Tower(2 if as_long else 3)
            self.language_model = Tower(2, self.config.text_config)

    assert all_blocks(VLM()) == ["language_model.layers.0", "language_model.layers.1"]


def test_transformers_llava_takes_its_language_model():
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
    text = dict(model_type="llama", hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=64)
    vision = dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                  num_attention_heads=2, image_size=16, patch_size=8)
    model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(text_config=text, vision_config=vision))
    assert all_blocks(model) == ["model.language_model.layers.0", "model.language_model.layers.1"]


def test_an_encoder_decoder_built_from_two_configs_is_scored_as_before():
    """``EncoderDecoderModel``'s root config has no count and its text config is the decoder's: the rule
    leaves it alone (the encoder's stack when as long, as before), not the decoder's as for a multimodal LM."""

    class DecoderConfig(PretrainedConfig):
        pass

    class EncDecConfig(PretrainedConfig):
        def get_text_config(self):
            return self.decoder

    class Tower(nn.Module):
        def __init__(self, config=None):
            super().__init__()
            self.config = config
            self.layers = nn.ModuleList(Block() for _ in range(2))

    class EncDec(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = EncDecConfig(is_encoder_decoder=True, decoder=DecoderConfig(num_hidden_layers=2))
            self.encoder, self.decoder = Tower(), Tower(self.config.decoder)

    assert all_blocks(EncDec()) == ["encoder.layers.0", "encoder.layers.1"]
