"""Configuration dataclasses: one per concern (stack, image, audio, text, model).

Every field is a plain type so a config round-trips through JSON and YAML; each class validates itself in
``__post_init__`` and raises ``ValueError`` naming the offending field and value.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from mmformer.values import is_int, is_number

MODALITIES = ("image", "audio", "text")
ROUTES = ("image", "audio", "text", "decoder")

Mlp = Literal["gelu", "gelu_tanh", "quickgelu", "relu", "swiglu", "geglu", "geglu_tanh"]
Norm = Literal["layernorm", "rmsnorm"]
NormPlacement = Literal["pre", "post", "sandwich"]
RelativePosition = Literal["none", "rope", "alibi", "t5"]
# rope_scaling["rope_type"] kinds and the keys each needs (Hugging Face's names and keys)
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
RopeScaling = tuple(ROPE_SCALING_KEYS)
AbsolutePosition = Literal["none", "learned", "sinusoidal"]


def _check_flags(config: Any) -> None:
    """Every ``bool`` field of a config dataclass holds a bool: a config.json or a dict that says ``"false"`` (a
    string, which Python reads as true) or ``1`` would otherwise build another model than it names, silently."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.type in ("bool", bool) and not isinstance(value, bool):
            raise TypeError(f"{type(config).__name__}.{f.name} must be true or false, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


# Sanity ceilings: far beyond any real model, low enough that a corrupt or malicious config cannot make building a
# model (or its position tables and STFT) take the machine's memory or minutes of work before anything else is checked.
LIMITS = {
    "width": 2**16,
    "depth": 4096,
    "n_heads": 2**12,
    "n_experts": 2**12,
    "vocab_size": 2**24,
    "max_length": 2**20,  # text positions
    "max_frames": 2**24,  # audio mel frames (about 46 hours at 10 ms)
    "image_side": 2**16,
    "n_mels": 2**12,
    "n_fft": 2**16,
    "mlp_hidden": 2**20,
}


def _check_at_most(name: str, value: float, limit_key: str) -> None:
    limit = LIMITS[limit_key]
    if value > limit:
        raise ValueError(f"{name} must be <= {limit} (mmformer's sanity limit), got {value!r}")


_STACK_CHOICES = {
    "mlp": Mlp.__args__,
    "norm": Norm.__args__,
    "norm_placement": NormPlacement.__args__,
    "position": RelativePosition.__args__,
}


@dataclass
class StackConfig:
    """A stack of transformer blocks; every architecture knob lives here rather than in new classes."""

    width: int = 256  # D, the model width
    depth: int = 4  # number of blocks
    n_heads: int = 4  # nh, query heads; head size hs = width // n_heads unless head_size says otherwise
    head_size: int | None = None  # hs when it is not width // n_heads (T5 v1.1, some Llama-style models)
    n_kv_heads: int | None = None  # key/value heads: None → n_heads (MHA), 1 → MQA, else GQA
    mlp: str = "gelu"  # gelu | gelu_tanh | quickgelu | relu | swiglu | geglu | geglu_tanh (the last three gated)
    mlp_ratio: float = 4.0  # hidden width = mlp_ratio * width (gated kinds: the hidden width of each branch)
    mlp_hidden: int | None = None  # explicit hidden width, overrides mlp_ratio
    n_experts: int = 0  # > 0: top-k mixture-of-experts MLP with this many experts
    experts_top_k: int = 2  # experts each token is routed to
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    norm_placement: str = "pre"  # pre | post | sandwich
    final_norm: bool = True  # norm after the last block (CLIP ln_post / ln_final, Whisper layer_norm)
    parallel: bool = False  # attention and MLP side by side from one norm (GPT-J, PaLM)
    bias: bool = True  # bias in linear layers
    qkv_bias: bool | None = None  # bias on the query/key/value projections only; None → bias (Qwen2: True, bias False)
    qk_norm: bool = False  # normalise queries and keys per head before the dot product
    attn_scale: float | None = None  # attention score scale; None → 1/sqrt(hs) (T5: 1.0, folded into its init)
    position: str = "none"  # relative positions inside attention: none | rope | alibi | t5 (bucketed learned bias)
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # Hugging Face's rope_scaling: {"rope_type": "llama3" | "linear", ...}
    relative_buckets: int = 32  # t5: buckets of the learned relative bias (half per direction when bidirectional)
    relative_max_distance: int = 128  # t5: distances from here on share the last bucket
    dropout: float = 0.0  # residual and MLP dropout
    attn_dropout: float = 0.0  # dropout on attention probabilities (training only)
    drop_path: float = 0.0  # stochastic depth, linearly increasing to this rate at the last block
    cross_attention: bool = False  # add a cross-attention sublayer, used only when memory is given
    multiway: list[str] = field(default_factory=list)  # modalities with their own MLP behind shared attention
    gradient_checkpointing: bool = False  # recompute block activations in backward to save memory
    layer_scale: float | None = None  # learned per-channel scale on each residual branch, from this value (DINOv2)
    cross_mlp: bool = False  # CoCa's multimodal layers: self-attention, MLP, cross-attention, a second MLP
    cross_memory_norm: bool = False  # a norm on the memory before the cross-attention keys/values (CoCa's ln_1_kv)

    def __post_init__(self) -> None:
        _check_flags(self)
        for name, choices in _STACK_CHOICES.items():
            _check_choice(f"StackConfig.{name}", getattr(self, name), choices)
        _check_positive("StackConfig.width", self.width)
        _check_positive("StackConfig.depth", self.depth, allow_zero=True)
        _check_positive("StackConfig.n_heads", self.n_heads)
        if self.head_size is not None:
            _check_positive("StackConfig.head_size", self.head_size)
            _check_at_most("StackConfig.head_size", self.head_size, "width")
        elif self.width % self.n_heads:
            raise ValueError(f"StackConfig.n_heads ({self.n_heads}) must divide StackConfig.width ({self.width})")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        _check_positive("StackConfig.n_kv_heads", self.n_kv_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"StackConfig.n_kv_heads ({self.n_kv_heads}) must divide StackConfig.n_heads ({self.n_heads})"
            )
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head size; StackConfig.width / n_heads = {self.head_dim}")
        self._check_rope_scaling()
        if self.position == "t5":
            _check_positive("StackConfig.relative_buckets", self.relative_buckets)
            _check_positive("StackConfig.relative_max_distance", self.relative_max_distance)
            if self.relative_buckets < 4:
                raise ValueError(f"StackConfig.relative_buckets must be >= 4, got {self.relative_buckets}")
        if self.n_experts < 0 or (self.n_experts and not 1 <= self.experts_top_k <= self.n_experts):
            raise ValueError(
                f"StackConfig.experts_top_k must be in [1, n_experts={self.n_experts}], got {self.experts_top_k}"
            )
        if self.parallel and (self.norm_placement != "pre" or self.cross_attention):
            raise ValueError(
                "StackConfig.parallel=True needs norm_placement='pre' and cross_attention=False, got "
                f"norm_placement={self.norm_placement!r}, cross_attention={self.cross_attention}"
            )
        for name in ("dropout", "attn_dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"StackConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        _check_positive("StackConfig.mlp_ratio", self.mlp_ratio)
        if self.attn_scale is not None:
            _check_positive("StackConfig.attn_scale", self.attn_scale)
        for name, key in (("width", "width"), ("depth", "depth"), ("n_heads", "n_heads"), ("n_experts", "n_experts")):
            _check_at_most(f"StackConfig.{name}", getattr(self, name), key)
        _check_at_most("StackConfig hidden width (mlp_ratio * width, or mlp_hidden)", self.hidden_dim, "mlp_hidden")
        for m in self.multiway:
            _check_choice("StackConfig.multiway entries", m, MODALITIES)
        if self.layer_scale is not None and (not is_number(self.layer_scale) or self.parallel):
            raise ValueError(
                f"StackConfig.layer_scale must be None or a finite number, and needs parallel=False; got "
                f"layer_scale={self.layer_scale!r}, parallel={self.parallel}"
            )
        if (self.cross_mlp or self.cross_memory_norm) and not self.cross_attention:
            raise ValueError(
                f"StackConfig.cross_mlp={self.cross_mlp} / cross_memory_norm={self.cross_memory_norm} need "
                "cross_attention=True"
            )

    def _check_rope_scaling(self) -> None:
        scaling = self.rope_scaling
        if scaling is None:
            return
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None
        if kind not in RopeScaling:
            raise ValueError(
                f"StackConfig.rope_scaling must be None or a dict with rope_type in {list(RopeScaling)}, "
                f"got {scaling!r}"
            )
        if self.position != "rope":
            raise ValueError(f"StackConfig.rope_scaling needs position='rope', got position={self.position!r}")
        missing = [k for k in ROPE_SCALING_KEYS[kind] if not isinstance(scaling.get(k), (int, float))]
        if missing:
            raise ValueError(
                f"StackConfig.rope_scaling of rope_type {kind!r} needs numbers for {missing}, got {scaling}"
            )
        if scaling["factor"] <= 0 or (kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]):
            raise ValueError(
                f"StackConfig.rope_scaling needs factor > 0 (and high_freq_factor > low_freq_factor), got {scaling}"
            )

    @property
    def head_dim(self) -> int:
        return self.head_size or self.width // self.n_heads

    @property
    def attention_bias(self) -> tuple[bool, bool]:
        """(bias of the query/key/value projections, bias of the output projection)."""
        return (self.bias if self.qkv_bias is None else self.qkv_bias), self.bias

    @property
    def hidden_dim(self) -> int:
        return self.mlp_hidden or int(self.mlp_ratio * self.width)


@dataclass
class ImageConfig:
    """ViT patch embedding: a strided convolution, optional class token, 2-D learned positions."""

    image_size: list[int] = field(default_factory=lambda: [224, 224])  # (H, W); an int means square
    patch_size: int = 16
    channels: int = 3
    class_token: bool = True
    position: str = "learned"  # learned (2-D table, bicubic-resampled to other sizes) | none
    patch_bias: bool = True  # bias in the patchify convolution (timm: yes, CLIP: no)
    pre_norm: bool = False  # norm on the tokens before the stack (CLIP's ln_pre)
    n_registers: int = 0  # learned register tokens after the class token (timm reg_tokens: DINOv2 with registers)
    # cls (first token) | mean (every token) | mean_patches (patch tokens only: timm's global_pool='avg') |
    # map (an attention-pooling head: a learned query reads the patch tokens, then a residual MLP; SigLIP, timm 'map')
    pool: str = "cls"
    pool_norm: bool = False  # a norm on the pooled features, before the projection (timm's fc_norm)
    # > 0: CoCa's attentional pooler: this many learned queries read the patch tokens and become the image tokens
    # (then a norm); the first is pooled, the others are what a decoder reads
    resampler_queries: int = 0
    resampler_width: int | None = None  # the pooler's width (CoCa: the embedding size); None: the stack's
    resampler_heads: int | None = None  # its attention heads; None: the stack's

    def __post_init__(self) -> None:
        _check_flags(self)
        if isinstance(self.image_size, int):
            self.image_size = [self.image_size, self.image_size]
        self.image_size = list(self.image_size)
        if len(self.image_size) != 2 or min(self.image_size) <= 0:
            raise ValueError(f"ImageConfig.image_size must be (H, W) > 0, got {self.image_size}")
        _check_at_most("ImageConfig.image_size (each side)", max(self.image_size), "image_side")
        _check_positive("ImageConfig.patch_size", self.patch_size)
        for side, n in zip(("height", "width"), self.image_size):
            if n % self.patch_size:
                raise ValueError(
                    f"ImageConfig.patch_size ({self.patch_size}) must divide the image {side} ({n}); "
                    f"image_size={self.image_size}"
                )
        _check_choice("ImageConfig.position", self.position, ("learned", "none"))
        _check_choice("ImageConfig.pool", self.pool, ("cls", "mean", "mean_patches", "map"))
        for name in ("n_registers", "resampler_queries"):
            _check_positive(f"ImageConfig.{name}", getattr(self, name), allow_zero=True)
            _check_at_most(f"ImageConfig.{name}", getattr(self, name), "max_length")
        for name in ("resampler_width", "resampler_heads"):
            if getattr(self, name) is not None:
                _check_positive(f"ImageConfig.{name}", getattr(self, name))
        if self.resampler_queries:
            if self.pool != "cls":
                raise ValueError(
                    f"ImageConfig.resampler_queries={self.resampler_queries} pools the first query: it needs "
                    f"pool='cls', got pool={self.pool!r}"
                )
        elif self.pool == "cls" and not self.class_token:
            raise ValueError("ImageConfig.pool='cls' needs class_token=True (or resampler_queries > 0)")

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def n_prefix(self) -> int:
        """Tokens before the patches: the class token and the registers."""
        return int(self.class_token) + self.n_registers

    @property
    def n_tokens(self) -> int:
        gh, gw = self.grid
        return gh * gw + self.n_prefix


@dataclass
class AudioConfig:
    """Log-mel features (torchaudio) and Whisper-style convolutional frames."""

    sample_rate: int = 16000
    n_mels: int = 80
    n_fft: int = 400
    hop_length: int = 160  # 10 ms frames at 16 kHz
    max_frames: int = 3000  # mel frames the position table covers (30 s); tokens = ceil(frames / conv_stride)
    conv_stride: int = 2  # stride of the second convolution (Whisper: 2)
    position: str = "sinusoidal"  # sinusoidal | learned | none
    pool: str = "mean"  # mean over real (unpadded) frames
    # Whisper's features: every waveform is zero-padded or cut to this many seconds before the log-mel, which has
    # samples / hop_length frames and one peak over the whole window; None: the waveform's own length (digits)
    pad_to_seconds: float | None = None

    def __post_init__(self) -> None:
        _check_flags(self)
        for name in ("sample_rate", "n_mels", "n_fft", "hop_length", "max_frames", "conv_stride"):
            _check_positive(f"AudioConfig.{name}", getattr(self, name))
        for name in ("n_mels", "n_fft", "max_frames"):
            _check_at_most(f"AudioConfig.{name}", getattr(self, name), name)
        _check_choice("AudioConfig.position", self.position, AbsolutePosition.__args__)
        _check_choice("AudioConfig.pool", self.pool, ("mean",))
        if self.pad_to_seconds is not None:
            if not is_number(self.pad_to_seconds) or self.pad_to_seconds <= 0:
                raise ValueError(f"AudioConfig.pad_to_seconds must be None or > 0, got {self.pad_to_seconds!r}")
            frames = self.window_samples // self.hop_length
            if self.window_samples != self.pad_to_seconds * self.sample_rate or frames > self.max_frames:
                raise ValueError(
                    f"AudioConfig.pad_to_seconds={self.pad_to_seconds} must be a whole number of samples at "
                    f"sample_rate={self.sample_rate} whose {frames} mel frames fit max_frames={self.max_frames}"
                )

    @property
    def window_samples(self) -> int:
        """Samples every waveform is padded or cut to (``pad_to_seconds``); 0 when waveforms keep their length."""
        return 0 if self.pad_to_seconds is None else round(self.pad_to_seconds * self.sample_rate)

    @property
    def max_tokens(self) -> int:
        return math.ceil(self.max_frames / self.conv_stride)


@dataclass
class TextConfig:
    """Token embedding, positions and the special ids the text encoder and the decoder rely on."""

    vocab_size: int = 1000
    max_length: int = 77  # position table size (the context length)
    position: str = "learned"  # learned | sinusoidal | none
    pad_id: int = 0
    bos_id: int | None = 1  # start of text; the decoder's first token
    eos_id: int | None = 2  # end of text; pooled by pool='eot' and where generation stops
    extra_eos_ids: list[int] = field(default_factory=list)  # other ids where generation stops (Llama 3 lists several)
    mask_id: int | None = None  # the [MASK] token of masked-language modelling (mlm)
    n_segments: int = 0  # > 0: BERT-style segment (token type) embeddings
    embed_norm: bool = False  # norm after the embeddings (BERT)
    embed_norm_eps: float = 1e-12
    causal: bool = False  # causal self-attention in the text *encoder* (CLIP's text tower is causal)
    # eot (first eos token, else the last real one) | mean | cls (first) | max (per feature, over the real tokens:
    # sentence-transformers' max pooling) | last (the last position, padding included:
    # SigLIP) | append_cls (a learned token appended after the text, whose state is pooled: CoCa's embed_cls)
    pool: str = "eot"
    fixed_length: bool = False  # the text encoder pads every text to its full length first (SigLIP, CoCa)
    attend_padding: bool = False  # the text encoder attends to padding too (SigLIP was trained without a mask)
    # append_cls only: the mask of open_clip's CoCa checkpoints (correct_cls_mask=False): the appended token reads
    # the text and the first padding position, but not itself
    legacy_cls_mask: bool = False

    def __post_init__(self) -> None:
        _check_flags(self)
        _check_positive("TextConfig.vocab_size", self.vocab_size)
        _check_positive("TextConfig.max_length", self.max_length)
        _check_at_most("TextConfig.vocab_size", self.vocab_size, "vocab_size")
        _check_at_most("TextConfig.max_length", self.max_length, "max_length")
        _check_choice("TextConfig.position", self.position, AbsolutePosition.__args__)
        _check_choice("TextConfig.pool", self.pool, ("eot", "mean", "cls", "max", "last", "append_cls"))
        if self.legacy_cls_mask and self.pool != "append_cls":
            raise ValueError(f"TextConfig.legacy_cls_mask=True needs pool='append_cls', got pool={self.pool!r}")
        if self.pool == "append_cls" and self.max_length < 2:
            raise ValueError(f"TextConfig.pool='append_cls' needs max_length >= 2, got {self.max_length}")
        for name in ("pad_id", "bos_id", "eos_id", "mask_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"TextConfig.{name} must be in [0, vocab_size={self.vocab_size}), got {value}")
        if not isinstance(self.extra_eos_ids, (list, tuple)) or not all(
            is_int(i) and 0 <= i < self.vocab_size for i in self.extra_eos_ids
        ):
            raise ValueError(f"TextConfig.extra_eos_ids: expected a list of ids in [0, vocab_size={self.vocab_size}), "
                             f"got {self.extra_eos_ids!r}")  # fmt: skip
        self.extra_eos_ids = list(self.extra_eos_ids)

    @property
    def max_tokens(self) -> int:
        """Most text tokens a sequence may hold: the position table, less the slot of an appended class token."""
        return self.max_length - (self.pool == "append_cls")


@dataclass
class GenerationConfig:
    """A checkpoint's own decoding rules, as Hugging Face's ``generation_config.json`` holds them (Whisper): the
    forced decoder prompt and tokens that are never generated. The decoder prompt is ``[bos]``, then a language
    token (detected from the audio when ``language_ids`` exist and no language is chosen), a task token and the
    no-timestamps token, each when the checkpoint has one."""

    suppress_tokens: list[int] = field(default_factory=list)  # never generated
    begin_suppress_tokens: list[int] = field(default_factory=list)  # not generated as the first new token
    language_ids: dict[str, int] = field(default_factory=dict)  # language code ("en") → its token
    task_ids: dict[str, int] = field(default_factory=dict)  # task ("transcribe", "translate") → its token
    language: str | None = None  # default language; None: detected when there are language_ids
    task: str | None = None  # default task; None: "transcribe" when there are task_ids
    no_timestamps_id: int | None = None  # appended to the prompt: text without timestamp tokens
    alignment_heads: list[list[int]] = field(default_factory=list)  # [layer, head] pairs for word timestamps

    def __post_init__(self) -> None:
        _check_flags(self)
        self.suppress_tokens, self.begin_suppress_tokens = list(self.suppress_tokens), list(self.begin_suppress_tokens)
        self.language_ids, self.task_ids = dict(self.language_ids), dict(self.task_ids)
        self.alignment_heads = [list(pair) for pair in self.alignment_heads]
        heads = self.alignment_heads
        if not all(len(pair) == 2 and all(isinstance(i, int) and i >= 0 for i in pair) for pair in heads):
            raise ValueError(f"GenerationConfig.alignment_heads must be [layer, head] pairs of ints >= 0, got {heads}")
        if self.language is not None and self.language not in self.language_ids:
            raise ValueError(
                f"GenerationConfig.language must be one of language_ids {sorted(self.language_ids)}, got "
                f"{self.language!r}"
            )
        if self.task is not None and self.task not in self.task_ids:
            raise ValueError(
                f"GenerationConfig.task must be one of task_ids {sorted(self.task_ids)}, got {self.task!r}"
            )

    def token_ids(self) -> list[int]:
        """Every token id the config names (checked against the vocabulary by :class:`ModelConfig`)."""
        ids = [*self.suppress_tokens, *self.begin_suppress_tokens, *self.language_ids.values(), *self.task_ids.values()]
        return ids + ([] if self.no_timestamps_id is None else [self.no_timestamps_id])


PROJECTIONS = ("linear", "none", "mlp")


@dataclass
class ModelConfig:
    """A multimodal model: named stacks, which stack each modality runs through, and the heads."""

    stacks: dict[str, StackConfig] = field(default_factory=lambda: {"shared": StackConfig(cross_attention=True)})
    routes: dict[str, str] = field(
        default_factory=lambda: {"image": "shared", "audio": "shared", "text": "shared", "decoder": "shared"}
    )
    image: ImageConfig | None = field(default_factory=ImageConfig)
    audio: AudioConfig | None = field(default_factory=AudioConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int | None = 256  # joint embedding size; None → no projection (features are the pooled tokens)
    projection_bias: bool = False
    logit_scale_init: float = math.log(1 / 0.07)  # CLIP's initial temperature
    logit_bias_init: float | None = None  # SigLIP: a learnable logit bias (e.g. -10)
    tie_lm_head: bool = True  # the LM head shares the token embedding matrix
    mlm_head: bool = False  # a masked-LM head on the text encoder (BERT: dense, activation, norm, tied decoder + bias)
    ctc_head: bool = False  # a CTC head on the audio tokens (blank = text.pad_id)
    # per-modality projection to the joint space when not "linear": "none" (the pooled features are the embedding:
    # SigLIP's image tower) or "mlp" (linear → GELU → linear without biases: open_clip's proj_type='mlp')
    projections: dict[str, str] = field(default_factory=dict)
    # what the decoder stack reads: "embeddings" (the token embeddings) or "text" (the text encoder's causal token
    # states before its final norm: CoCa, whose caption decoder continues its text tower)
    decoder_input: str = "embeddings"
    generation: GenerationConfig | None = None  # the checkpoint's decoding rules (Whisper), if any

    def __post_init__(self) -> None:
        _check_flags(self)
        self.stacks = {k: v if isinstance(v, StackConfig) else StackConfig(**v) for k, v in self.stacks.items()}
        if isinstance(self.image, dict):
            self.image = ImageConfig(**self.image)
        if isinstance(self.audio, dict):
            self.audio = AudioConfig(**self.audio)
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)
        if isinstance(self.generation, dict):
            self.generation = GenerationConfig(**self.generation)
        if not self.stacks:
            raise ValueError("ModelConfig.stacks must name at least one stack")
        for route, stack in self.routes.items():
            _check_choice("ModelConfig.routes keys", route, ROUTES)
            if stack not in self.stacks:
                raise ValueError(f"ModelConfig.routes[{route!r}] = {stack!r} is not one of stacks {list(self.stacks)}")
        for modality in ("image", "audio"):
            if modality in self.routes and getattr(self, modality) is None:
                raise ValueError(f"ModelConfig.routes has {modality!r} but ModelConfig.{modality} is None")
        self._check_routed_stacks()
        self._check_sinusoids()
        # a decoder without cross_attention is a decoder-only language model (it reads no memory)
        if "decoder" in self.routes and (self.text.bos_id is None or self.text.eos_id is None):
            raise ValueError("a decoder needs TextConfig.bos_id and TextConfig.eos_id")
        self._check_heads()
        if self.embed_dim is None:
            widths = {m: self.feature_width(m) for m in MODALITIES if m in self.routes}
            if len(set(widths.values())) > 1:
                raise ValueError(f"ModelConfig.embed_dim=None needs equal stack widths per modality, got {widths}")
        widths = {self.width(r) for r in ("text", "decoder") if r in self.routes}
        if len(widths) > 1:
            raise ValueError(
                f"the text and decoder routes share the token embedding, so their widths must match: {widths}"
            )
        if self.ctc_head and "audio" not in self.routes:
            raise ValueError("ModelConfig.ctc_head=True needs an audio route")
        if self.mlm_head and "text" not in self.routes:
            raise ValueError(f"ModelConfig.mlm_head=True needs a text route, got routes {sorted(self.routes)}")

    def _check_routed_stacks(self) -> None:
        """What the routes need of their stacks: at least one block (a stack of depth 0 is only its final norm: no
        token ever reads another, and a decoder has no cross-attention left to read its memory with), and a decoder
        with cross-attention as wide as the image and audio token states it reads, since they reach its keys and
        values without a projection (the text encoder's states share its token embedding, checked with it)."""
        for name, stack in self.stacks.items():
            users = [route for route, used in self.routes.items() if used == name]
            if users and stack.depth == 0:
                raise ValueError(f"ModelConfig.stacks[{name!r}].depth must be > 0 for routes {users}, got 0")
        decoder = self.routes.get("decoder")
        if decoder is None or not self.stacks[decoder].cross_attention:
            return
        memory = {m: self.feature_width(m) for m in ("image", "audio") if m in self.routes}
        if any(width != self.width("decoder") for width in memory.values()):
            raise ValueError(
                f"ModelConfig.stacks[{decoder!r}].width ({self.width('decoder')}), the decoder's, must equal the "
                "width of the image and audio token states its cross-attention reads (the stack widths, or "
                f"ImageConfig.resampler_width), got {memory}"
            )

    def _check_sinusoids(self) -> None:
        """Sinusoidal positions are sin and cos halves over width / 2 - 1 timescale steps, added to the tokens of the
        stack the modality's route runs through (the text embedding's: the text route's, else the decoder's): that
        width must be even and at least 4."""
        text_route = next((route for route in ("text", "decoder") if route in self.routes), None)
        for modality, route in (("audio", "audio" if "audio" in self.routes else None), ("text", text_route)):
            if route is None or getattr(self, modality).position != "sinusoidal":
                continue
            width = self.width(route)
            if width % 2 or width < 4:
                raise ValueError(
                    f"{modality.capitalize()}Config.position='sinusoidal' needs an even width >= 4 for the {route} "
                    f"route's tokens, got ModelConfig.stacks[{self.routes[route]!r}].width={width}"
                )

    def _check_heads(self) -> None:
        """Projection kinds, the decoder's input and the generation rules."""
        for modality, kind in self.projections.items():
            _check_choice("ModelConfig.projections keys", modality, MODALITIES)
            _check_choice(f"ModelConfig.projections[{modality!r}]", kind, PROJECTIONS)
            if kind != "none" and self.embed_dim is None:  # the model would build no projection at all
                raise ValueError(
                    f"ModelConfig.projections[{modality!r}]={kind!r} needs embed_dim (the joint size it projects to), "
                    "got embed_dim=None; set embed_dim, or 'none' to use the pooled features as they are"
                )
            unprojected = kind == "none" and self.embed_dim is not None and modality in self.routes
            if unprojected and self.feature_width(modality) != self.embed_dim:
                raise ValueError(
                    f"ModelConfig.projections[{modality!r}]='none' needs its features as wide as embed_dim="
                    f"{self.embed_dim}, got {self.feature_width(modality)}"
                )
        _check_choice("ModelConfig.decoder_input", self.decoder_input, ("embeddings", "text"))
        if self.decoder_input == "text":
            if "text" not in self.routes or "decoder" not in self.routes:
                raise ValueError("ModelConfig.decoder_input='text' needs a text route and a decoder route")
            text, dec = self.stacks[self.routes["text"]], self.stacks[self.routes["decoder"]]
            if (text.n_kv_heads, text.head_dim) != (dec.n_kv_heads, dec.head_dim) or text is dec:
                raise ValueError(
                    "ModelConfig.decoder_input='text' runs the text stack and then the decoder stack through one KV "
                    f"cache: they must be two stacks with equal key/value heads and head size, got text "
                    f"({text.n_kv_heads}, {text.head_dim}) and decoder ({dec.n_kv_heads}, {dec.head_dim})"
                )
        if self.generation is not None:
            outside = sorted({i for i in self.generation.token_ids() if not 0 <= i < self.text.vocab_size})
            if outside:
                raise ValueError(
                    f"ModelConfig.generation names token ids outside the vocabulary [0, {self.text.vocab_size}): "
                    f"{outside[:10]}"
                )
        image = self.image
        if image is not None and image.resampler_queries and "image" in self.routes:
            width, heads = (
                self.feature_width("image"),
                image.resampler_heads or self.stacks[self.routes["image"]].n_heads,
            )
            if width % heads:
                raise ValueError(f"ImageConfig.resampler_heads ({heads}) must divide the resampler width ({width})")

    def width(self, route: str) -> int:
        """Width of the stack a route runs through."""
        return self.stacks[self.routes[route]].width

    def feature_width(self, modality: str) -> int:
        """Width of a modality's token states after its tower: the stack's, or the image resampler's."""
        if modality == "image" and self.image is not None and self.image.resampler_queries:
            return self.image.resampler_width or self.width("image")
        return self.width(modality)

    def text_width(self) -> int:
        route = "text" if "text" in self.routes else "decoder"
        return self.width(route)

    def parameter_floor(self) -> int:
        """A cheap lower bound on the parameters this config declares, computed without building anything: each
        block's query and output projections (2 D nh hs) and MLP (2 D H per expert), the token table and the learned
        position tables.
        Loading compares it with the weights file's size before building the model at all."""
        floor = sum(
            stack.depth
            * (
                2 * stack.width * stack.n_heads * stack.head_dim
                + max(stack.n_experts, 1) * 2 * stack.width * stack.hidden_dim
            )
            for stack in self.stacks.values()
        )
        if "text" in self.routes or "decoder" in self.routes:
            width = self.text_width()
            floor += self.text.vocab_size * width
            if self.text.position == "learned":
                floor += self.text.max_length * width
        if "audio" in self.routes and self.audio.position == "learned":
            floor += self.audio.max_tokens * self.width("audio")
        if "image" in self.routes and self.image.position == "learned":
            floor += self.image.n_tokens * self.width("image")
        return floor

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def unknown_keys(cls, d: dict) -> list[str]:
        """The keys of ``d`` that are no field of this class, sorted: a typo, or fields a subclass added."""
        return sorted(set(d) - {f.name for f in dataclasses.fields(cls)})

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        unknown = cls.unknown_keys(d)
        if unknown:
            known = sorted(f.name for f in dataclasses.fields(cls))
            raise ValueError(f"{cls.__name__}: unknown keys {unknown}; expected a subset of {known}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))
