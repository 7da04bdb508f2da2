"""What fits where: a memory model of one fine-tuning step of the released Higgs Audio v2 in bf16.

Peak memory = the weights (bf16) + what the optimizer keeps for the trainable parameters + the peak
of the step's activations. Parameter counts come from the released config, built on the ``meta``
device (nothing allocated, nothing downloaded). The activation peak is built from figures, in bytes
per expanded position, that ``benchmarks/memory_bench.py`` measured at the released widths in bf16
with LoRA r 16 (``compat/memory.toml``):

- what one decoder layer saves for backward (``layer``), or with checkpointing only its input
  (``layer_checkpointed``);
- what is saved outside the layers (``outside``: embeddings, norm, audio head, loss) and per row of
  text logits (``text_row``: every position, or with ``sparse-text-logits`` the supervised ones);
- the transient of backward on top of what is saved, the larger of: at the text head, per text-logit
  row (``backward_text_row``: the logits' gradient and its softmax); in a layer, per position
  (``backward``: its backward buffers, plus with checkpointing ``backward_recompute``: the layer
  recomputed and its buffers); and on top, a share of the layers' saved bytes that backward has freed
  but the allocator had not yet reused (``backward_per_layer``, measured with glibc on a CPU: likely
  less under CUDA's caching allocator, so the estimate errs high there).

Assumptions (said by ``higgs-patch memory``): bf16 weights; LoRA adapters in fp32 (PEFT's default)
with AdamW, 16 bytes per adapter parameter; a full fine-tune keeps bf16 gradients and AdamW's two
moments in bf16 (torch's AdamW on a bf16 model), 6 bytes per parameter beyond the weights, with the
LoRA activation figures (an upper bound: no fp32 copies of adapter inputs). Activations grow
linearly with positions x batch. Not counted: the CUDA context, the batch itself.

Checked by the benchmark: figures from its 2-layer run predict the peak growth of each variant at 2
and at 4 layers within 15% (docs/memory.md).
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from importlib import resources

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: The settings of the released checkpoint's config.json that shape its memory (design notes).
RELEASED = dict(
    text_config=dict(
        model_type="llama", vocab_size=128_256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
        max_position_embeddings=131_072, rms_norm_eps=1e-5, rope_theta=500_000.0,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
    ),
    audio_adapter_type="dual_ffn_fast_forward",
    audio_ffn_hidden_size=3072, audio_ffn_intermediate_size=8192,
    audio_num_codebooks=8, audio_codebook_size=1024,
    skip_audio_tower=True, encode_whisper_embed=False, encode_audio_in_tokens=True, use_delay_pattern=True,
    audio_decoder_proj_num_layers=0, use_audio_out_self_attention=False,
)
LAYERS = 28
#: What the command can estimate: the released model's positions; full rank of the narrowest adapted
#: projection (k_proj, v_proj: 3,072 -> 8 KV heads x 128); a batch per GPU far past any GPU's memory.
MAX_POSITIONS = RELEASED["text_config"]["max_position_embeddings"]
MAX_RANK = RELEASED["text_config"]["num_key_value_heads"] * RELEASED["text_config"]["head_dim"]
MAX_BATCH = 65_536
#: Where LoRA goes, in the figures and the table: attention, MLP and audio MLP of every decoder layer.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WEIGHT_BYTES = 2  # bf16
LORA_STATE_BYTES = 16  # fp32 adapter, its gradient, AdamW's two moments
FULL_STATE_BYTES = 6  # bf16 gradient and AdamW's two moments in bf16
FIGURES = ("layer", "layer_checkpointed", "outside", "text_row", "backward_text_row", "backward",
           "backward_recompute", "backward_per_layer")
GIB = 2**30


def released_config(layers: int = LAYERS, **overrides):
    """The released architecture with ``layers`` decoder layers, DualFFN on every one."""
    from boson_multimodal.model.higgs_audio.configuration_higgs_audio import HiggsAudioConfig

    settings = {**RELEASED, **overrides}
    settings["text_config"] = {**RELEASED["text_config"], "num_hidden_layers": layers}
    settings["audio_dual_ffn_layers"] = list(range(layers))
    return HiggsAudioConfig(**settings)


@dataclass(frozen=True)
class Parameters:
    total: int
    lora_per_rank: int  # adapter parameters of LoRA rank 1 on LORA_TARGETS; rank r has r times as many


@functools.lru_cache(maxsize=4)
def parameters(layers: int = LAYERS) -> Parameters:
    """Counted on the ``meta`` device: the model is built without allocating a byte."""
    import torch
    from boson_multimodal.model.higgs_audio.modeling_higgs_audio import HiggsAudioModel

    with torch.device("meta"):
        net = HiggsAudioModel(released_config(layers))
    lora = sum(
        module.in_features + module.out_features
        for name, module in net.layers.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS
    )
    return Parameters(total=sum(p.numel() for p in net.parameters()), lora_per_rank=lora)


@dataclass(frozen=True)
class Figures:
    """Bytes per expanded position (or per text-logit row), and where they were measured."""

    layer: float
    layer_checkpointed: float
    outside: float
    text_row: float
    backward_text_row: float
    backward: float
    backward_recompute: float
    backward_per_layer: float  # a fraction of the layers' saved bytes, not bytes per position
    measured: str = ""


@functools.lru_cache(maxsize=1)
def measured_figures() -> Figures:
    """The figures shipped in ``compat/memory.toml``."""
    data = tomllib.loads(resources.files("higgs_patch.compat").joinpath("memory.toml").read_text(encoding="utf-8"))
    return Figures(**{name: float(data[name]) for name in FIGURES}, measured=data.get("measured", ""))


def activation_peak(figures: Figures, layers: int, positions: int, supervised: int, checkpointing: bool,
                    sparse: bool) -> float:
    """Peak bytes the activations of one training step add: what is saved, plus backward's transient.

    Backward peaks either at the text head (the logits' gradient and softmax, per text-logit row) or in
    a decoder layer (its backward buffers, per position, plus with checkpointing the layer being
    recomputed), whichever is larger; on top of that, a share of the layers' saved bytes that backward
    frees but the allocator does not hand back in time (``backward_per_layer``).
    """
    rows = supervised if sparse else positions
    per_layer = figures.layer_checkpointed if checkpointing else figures.layer
    saved = positions * (figures.outside + layers * per_layer) + rows * figures.text_row
    at_head = rows * figures.backward_text_row
    in_layer = positions * (figures.backward + (figures.backward_recompute if checkpointing else 0.0))
    held = figures.backward_per_layer * layers * positions * per_layer
    return saved + max(at_head, in_layer) + held


@dataclass(frozen=True)
class Estimate:
    variant: str
    weights: float
    states: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.states + self.activations


VARIANTS = {
    "plain": dict(checkpointing=False, sparse=False),
    "gradient-checkpointing": dict(checkpointing=True, sparse=False),
    "sparse-text-logits": dict(checkpointing=False, sparse=True),
    "both": dict(checkpointing=True, sparse=True),
}


def estimate(seq: int, batch: int = 1, lora: int | None = 16, supervised_fraction: float = 0.02,
             layers: int = LAYERS, figures: Figures | None = None) -> list[Estimate]:
    """One estimate per variant (plain, each patch, both) of a training step; ``lora=None``: full fine-tune."""
    if seq < 1 or batch < 1 or layers < 1:
        raise ValueError(f"seq, batch and layers must be positive (got seq={seq}, batch={batch}, layers={layers})")
    if lora is not None and lora < 1:
        raise ValueError(f"the LoRA rank must be positive, or None for a full fine-tune (got {lora})")
    if not 0 <= supervised_fraction <= 1:
        raise ValueError(f"supervised_fraction is a fraction of positions, between 0 and 1 (got {supervised_fraction})")
    figures = figures or measured_figures()
    counts = parameters(layers)
    weights = counts.total * WEIGHT_BYTES
    states = counts.lora_per_rank * lora * LORA_STATE_BYTES if lora else counts.total * FULL_STATE_BYTES
    positions = seq * batch
    supervised = round(positions * supervised_fraction)
    return [
        Estimate(name, weights, states, activation_peak(figures, layers, positions, supervised, **flags))
        for name, flags in VARIANTS.items()
    ]


def figures_from(found: dict[str, dict]) -> Figures:
    """The figures, from one run of the memory benchmark's four variants (``plain``, ``checkpointing``, ...).

    Saved bytes come from the counts of each run. The first layer also saves what the later ones share
    with it (the mask, the rotary tables): that goes to ``outside``, so that ``layer`` is what each
    further layer adds. The transients (peak growth less saved bytes) of the four variants give the
    four transient figures: the dense variants peak at the text head, the sparse ones in a layer.
    """
    plain, checkpointed, sparse, both = (found[name] for name in ("plain", "checkpointing", "sparse", "both"))
    positions, kept_rows, layers = plain["positions"], sparse["supervised_text"], len(plain["saved_per_layer"])

    def later(result) -> float:
        per_layer = result["saved_per_layer"][1:] or result["saved_per_layer"]
        return sum(per_layer) / len(per_layer)

    def transient(result) -> float:
        return result["growth"] - result["saved_outside"] - sum(result["saved_per_layer"])

    first_extra = plain["saved_per_layer"][0] - later(plain)
    text_row = (plain["saved_outside"] - sparse["saved_outside"]) / (positions - kept_rows)
    outside = (sparse["saved_outside"] + first_extra - kept_rows * text_row) / positions
    held_plain, held_checkpointed = layers * later(plain), layers * later(checkpointed)
    share = (transient(plain) - transient(checkpointed)) / (held_plain - held_checkpointed)
    at_head = transient(plain) - share * held_plain
    in_layer = transient(sparse) - share * held_plain
    recompute = transient(both) - share * held_checkpointed - in_layer
    return Figures(layer=later(plain) / positions, layer_checkpointed=later(checkpointed) / positions, outside=outside,
                   text_row=text_row, backward_text_row=at_head / positions, backward=in_layer / positions,
                   backward_recompute=recompute / positions, backward_per_layer=share)


def figures_toml(figures: Figures, measured: str) -> str:
    lines = ["# Printed by benchmarks/memory_bench.py: bytes per expanded position (text_row, backward_text_row:",
             "# per row of text logits). higgs_patch/memory.py says what each one is.", f"measured = {measured!r}"]
    lines += [f"{name} = {getattr(figures, name):.4g}" for name in FIGURES]
    return "\n".join(lines) + "\n"


CARDS_GIB = (16, 24, 40, 48, 80, 141)
ASSUMPTIONS = """Assumptions: bf16 weights; LoRA adapters in fp32 (PEFT's default) with AdamW, 16 bytes per adapter
parameter; a full fine-tune keeps bf16 gradients and AdamW's moments in bf16 (6 bytes per parameter beyond
the weights). Activations from figures measured at the released widths on a CPU (LoRA, bf16), linear in
positions x batch: saved tensors carry over to a GPU as they are; backward's buffers were measured with CPU
attention kernels and glibc's allocator, which hold more than flash attention and CUDA's caching allocator,
so the estimate errs high. Not counted: the CUDA context (about 0.5-1 GiB) and the batch itself."""


def render(estimates: list[Estimate]) -> str:
    header = ("variant", "weights", "optimizer", "activations", "total", "fits on")
    lines = [header]
    for e in estimates:
        fits = next((f"{card} GiB" for card in CARDS_GIB if e.total <= card * GIB), "none listed")
        lines.append((e.variant, *(f"{value / GIB:.1f} GiB" for value in (e.weights, e.states, e.activations, e.total)),
                      fits))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  " + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        for line in lines
    )
