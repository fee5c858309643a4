"""Everything qconvert knows about the Qwen-Image transformer, in one place.

Formats and converters never parse key strings themselves: they ask this
module for a tensor's role and block.  Supporting another architecture means
writing one more module with the same functions (``detect``, ``config_from``,
``expected_shapes``, ``describe``).

Names are the official diffusers ones (``QwenImageTransformer2DModel``), which
ComfyUI uses too.  Key facts (shapes, counts, variant markers) come from
``shared/specs/gguf.md`` §2 and ``fp8-lora-sampler.md`` §2.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Mapping

from qconvert.core import untrusted
from qconvert.core.errors import CheckpointError, QConvertError

ARCHITECTURE = "qwen_image"
DIFFUSERS_CLASS = "QwenImageTransformer2DModel"

# Edit-2511 files from Comfy-Org carry this empty tensor so ComfyUI picks the
# "index_timestep_zero" reference method; it must survive conversion.
MARKER_EDIT_2511 = "__index_timestep_zero__"
# Qwen-Image-Layered adds this embedding (nn.Embedding(2, inner_dim)).
ADDITION_T_EMBEDDING = "time_text_embed.addition_t_embedding.weight"

# The keys city96's convert.py checks to recognise Qwen-Image.
DETECTION_KEYS = (
    "time_text_embed.timestep_embedder.linear_2.weight",
    "transformer_blocks.0.attn.norm_added_q.weight",
    "transformer_blocks.0.img_mlp.net.0.proj.weight",
    "txt_norm.weight",
)

TIMESTEP_CHANNELS = 256  # fixed by QwenTimestepProjEmbeddings


class Role(enum.Enum):
    """What a tensor is for.  Policies (type choice, FP8 keep-lists) key on this."""

    IMG_Q = "img_q"
    IMG_K = "img_k"
    IMG_V = "img_v"
    IMG_OUT = "img_out"
    TXT_Q = "txt_q"
    TXT_K = "txt_k"
    TXT_V = "txt_v"
    TXT_OUT = "txt_out"
    IMG_MOD = "img_mod"
    TXT_MOD = "txt_mod"
    IMG_MLP_UP = "img_mlp_up"
    IMG_MLP_DOWN = "img_mlp_down"
    TXT_MLP_UP = "txt_mlp_up"
    TXT_MLP_DOWN = "txt_mlp_down"
    QK_NORM = "qk_norm"  # RMSNorm weights over head_dim
    BIAS = "bias"
    EMBED = "embed"  # img_in, txt_in, time_text_embed.*
    FINAL = "final"  # norm_out.linear, proj_out
    NORM = "norm"  # txt_norm
    MARKER = "marker"  # variant marker tensors


BLOCK_LINEARS = frozenset(
    {
        Role.IMG_Q, Role.IMG_K, Role.IMG_V, Role.IMG_OUT,
        Role.TXT_Q, Role.TXT_K, Role.TXT_V, Role.TXT_OUT,
        Role.IMG_MOD, Role.TXT_MOD,
        Role.IMG_MLP_UP, Role.IMG_MLP_DOWN, Role.TXT_MLP_UP, Role.TXT_MLP_DOWN,
    }
)
V_PROJECTIONS = frozenset({Role.IMG_V, Role.TXT_V})
MLP_DOWN = frozenset({Role.IMG_MLP_DOWN, Role.TXT_MLP_DOWN})

# Named groups of roles, for options such as ``to-fp8 --keep mod,attn``.
ROLE_GROUPS: Mapping[str, frozenset] = {
    "mod": frozenset({Role.IMG_MOD, Role.TXT_MOD}),
    "attn": frozenset({Role.IMG_Q, Role.IMG_K, Role.IMG_V, Role.IMG_OUT,
                       Role.TXT_Q, Role.TXT_K, Role.TXT_V, Role.TXT_OUT}),
    "qkv": frozenset({Role.IMG_Q, Role.IMG_K, Role.IMG_V, Role.TXT_Q, Role.TXT_K, Role.TXT_V}),
    "attn_out": frozenset({Role.IMG_OUT, Role.TXT_OUT}),
    "v": V_PROJECTIONS,
    "mlp": frozenset({Role.IMG_MLP_UP, Role.IMG_MLP_DOWN, Role.TXT_MLP_UP, Role.TXT_MLP_DOWN}),
    "mlp_up": frozenset({Role.IMG_MLP_UP, Role.TXT_MLP_UP}),
    "mlp_down": MLP_DOWN,
    "img": frozenset({Role.IMG_Q, Role.IMG_K, Role.IMG_V, Role.IMG_OUT, Role.IMG_MOD,
                      Role.IMG_MLP_UP, Role.IMG_MLP_DOWN}),
    "txt": frozenset({Role.TXT_Q, Role.TXT_K, Role.TXT_V, Role.TXT_OUT, Role.TXT_MOD,
                      Role.TXT_MLP_UP, Role.TXT_MLP_DOWN}),
}
ROLE_GROUPS = {**ROLE_GROUPS, **{r.value: frozenset({r}) for r in BLOCK_LINEARS}}

# Per-block linear modules (relative to ``transformer_blocks.{i}.``) and their role.
_BLOCK_LINEAR_MODULES = {
    "attn.to_q": Role.IMG_Q,
    "attn.to_k": Role.IMG_K,
    "attn.to_v": Role.IMG_V,
    "attn.to_out.0": Role.IMG_OUT,
    "attn.add_q_proj": Role.TXT_Q,
    "attn.add_k_proj": Role.TXT_K,
    "attn.add_v_proj": Role.TXT_V,
    "attn.to_add_out": Role.TXT_OUT,
    "img_mod.1": Role.IMG_MOD,
    "txt_mod.1": Role.TXT_MOD,
    "img_mlp.net.0.proj": Role.IMG_MLP_UP,
    "img_mlp.net.2": Role.IMG_MLP_DOWN,
    "txt_mlp.net.0.proj": Role.TXT_MLP_UP,
    "txt_mlp.net.2": Role.TXT_MLP_DOWN,
}
_BLOCK_NORMS = ("attn.norm_q", "attn.norm_k", "attn.norm_added_q", "attn.norm_added_k")
_TOP_LINEARS = {
    "img_in": Role.EMBED,
    "txt_in": Role.EMBED,
    "time_text_embed.timestep_embedder.linear_1": Role.EMBED,
    "time_text_embed.timestep_embedder.linear_2": Role.EMBED,
    "norm_out.linear": Role.FINAL,
    "proj_out": Role.FINAL,
}

# Qwen-Image has 60 blocks; the bound keeps a hostile config or tensor name
# ("transformer_blocks.<a billion>.…") from asking for a billion blocks' keys.
MAX_LAYERS = 1024
# Widths (inner, text, channels) far beyond any real model's; bounds for hostile configs.
MAX_WIDTH = 1 << 16
# Block indices as diffusers writes them: no sign, no leading zeros, no more
# digits than MAX_LAYERS needs ("transformer_blocks.00" would alias block 0).
_BLOCK_RE = re.compile(r"^transformer_blocks\.(0|[1-9][0-9]{0,3})\.(.+)\.(weight|bias)$")


@dataclass(frozen=True)
class QwenImageConfig:
    """The transformer's ``config.json`` (diffusers ``QwenImageTransformer2DModel``)."""

    num_layers: int = 60
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    joint_attention_dim: int = 3584
    in_channels: int = 64
    out_channels: int = 16
    patch_size: int = 2
    axes_dims_rope: tuple = (16, 56, 56)
    guidance_embeds: bool = False
    zero_cond_t: bool = False
    use_additional_t_cond: bool = False
    use_layer3d_rope: bool = False

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def ffn_dim(self) -> int:
        return 4 * self.inner_dim

    @property
    def last_block(self) -> int:
        return self.num_layers - 1

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        # Qwen-Image's published config also has an unused pooled_projection_dim;
        # it is left out because diffusers warns about it on every load.
        return {"_class_name": DIFFUSERS_CLASS, "_diffusers_version": "0.35.0", **d}

    @classmethod
    def from_json(cls, data: Mapping, where: str = "transformer config") -> "QwenImageConfig":
        """A config from ``config.json``'s object, every field checked for type and range.

        Missing fields take Qwen-Image's values; unknown ones (``pooled_projection_dim``) are ignored.
        """
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{where}: not a JSON object but {untrusted.type_name(data)}")
        d = cls()
        ints = {name: untrusted.field_int(data, name, where, low=low, high=high, default=getattr(d, name))
                for name, low, high in (("num_layers", 1, MAX_LAYERS), ("num_attention_heads", 1, MAX_WIDTH),
                                        ("attention_head_dim", 1, MAX_WIDTH),
                                        ("joint_attention_dim", 1, MAX_WIDTH), ("in_channels", 1, MAX_WIDTH),
                                        ("patch_size", 1, 64))}
        out = data.get("out_channels")
        ints["out_channels"] = d.out_channels if out is None else untrusted.field_int(
            data, "out_channels", where, low=1, high=MAX_WIDTH)
        flags = {name: untrusted.field_bool(data, name, where, default=getattr(d, name))
                 for name in ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope")}
        axes = data.get("axes_dims_rope", list(d.axes_dims_rope))
        if (not isinstance(axes, (list, tuple)) or len(axes) != 3
                or not all(isinstance(a, int) and not isinstance(a, bool) and 0 <= a <= MAX_WIDTH for a in axes)):
            raise CheckpointError(f"{where}: axes_dims_rope must be a list of three dimensions, not "
                                  f"{untrusted.shown(axes, 60)}")
        return validated(cls(**ints, **flags, axes_dims_rope=tuple(axes)), where)


def validated(config: QwenImageConfig, where: str) -> QwenImageConfig:
    """Relations between fields that every Qwen-Image config keeps."""
    if config.inner_dim > MAX_WIDTH:
        raise CheckpointError(f"{where}: {config.num_attention_heads} heads of {config.attention_head_dim} make "
                              f"an inner dimension of {config.inner_dim:,}, beyond any Qwen-Image ({MAX_WIDTH:,})")
    if sum(config.axes_dims_rope) != config.attention_head_dim:
        raise CheckpointError(f"{where}: axes_dims_rope {list(config.axes_dims_rope)} must add up to "
                              f"attention_head_dim {config.attention_head_dim}")
    return config


@dataclass(frozen=True)
class TensorInfo:
    """What the model map knows about one tensor name."""

    name: str
    role: Role
    block: int | None  # transformer block index, None for top-level tensors
    module: str  # the module path without ``.weight``/``.bias``

    @property
    def is_block_linear(self) -> bool:
        return self.role in BLOCK_LINEARS


def describe(name: str) -> TensorInfo:
    """Role and block of a Qwen-Image tensor name.  Raises KeyError for names outside the model."""
    return _describe(name)


@lru_cache(maxsize=8192)
def _describe(name: str) -> TensorInfo:
    if name == MARKER_EDIT_2511:
        return TensorInfo(name, Role.MARKER, None, name)
    m = _BLOCK_RE.match(name)
    if m:
        block, module, kind = int(m.group(1)), m.group(2), m.group(3)
        if block >= MAX_LAYERS:
            raise KeyError(name)
        if module in _BLOCK_LINEAR_MODULES:
            role = _BLOCK_LINEAR_MODULES[module] if kind == "weight" else Role.BIAS
            return TensorInfo(name, role, block, f"transformer_blocks.{block}.{module}")
        if module in _BLOCK_NORMS and kind == "weight":
            return TensorInfo(name, Role.QK_NORM, block, f"transformer_blocks.{block}.{module}")
        raise KeyError(name)
    if name == ADDITION_T_EMBEDDING:
        return TensorInfo(name, Role.EMBED, None, name.rsplit(".", 1)[0])
    if name == "txt_norm.weight":
        return TensorInfo(name, Role.NORM, None, "txt_norm")
    module, _, kind = name.rpartition(".")
    if module in _TOP_LINEARS and kind in ("weight", "bias"):
        return TensorInfo(name, _TOP_LINEARS[module] if kind == "weight" else Role.BIAS, None, module)
    raise KeyError(name)


def parse_role_groups(items) -> tuple:
    """``--keep`` values ("mod", "v,mlp_down", ...) as sorted ROLE_GROUPS names; an unknown name is an error."""
    groups = sorted({g.strip() for item in items for g in item.split(",") if g.strip()})
    unknown = [g for g in groups if g not in ROLE_GROUPS]
    if unknown:
        raise QConvertError(f"--keep: unknown group(s) {', '.join(unknown)}; valid groups are "
                            f"{', '.join(sorted(ROLE_GROUPS))}")
    return tuple(groups)


def block_linear_modules() -> tuple:
    """The linear layers of one block, relative to ``transformer_blocks.{i}.`` (``attn.to_q`` ...)."""
    return tuple(_BLOCK_LINEAR_MODULES)


def is_known(name: str) -> bool:
    return _known(name) is not None


def expected_shapes(config: QwenImageConfig, *, marker: bool = False) -> dict[str, tuple]:
    """Every tensor of a model with this config, name → torch shape, in sorted (file) order."""
    d, t, f = config.inner_dim, config.joint_attention_dim, config.ffn_dim
    out = config.patch_size * config.patch_size * config.out_channels
    shapes: dict[str, tuple] = {
        "img_in.weight": (d, config.in_channels),
        "img_in.bias": (d,),
        "txt_in.weight": (d, t),
        "txt_in.bias": (d,),
        "txt_norm.weight": (t,),
        "time_text_embed.timestep_embedder.linear_1.weight": (d, TIMESTEP_CHANNELS),
        "time_text_embed.timestep_embedder.linear_1.bias": (d,),
        "time_text_embed.timestep_embedder.linear_2.weight": (d, d),
        "time_text_embed.timestep_embedder.linear_2.bias": (d,),
        "norm_out.linear.weight": (2 * d, d),
        "norm_out.linear.bias": (2 * d,),
        "proj_out.weight": (out, d),
        "proj_out.bias": (out,),
    }
    if config.use_additional_t_cond:
        shapes[ADDITION_T_EMBEDDING] = (2, d)
    linear_shapes = {
        "img_mod.1": (6 * d, d),
        "txt_mod.1": (6 * d, d),
        "img_mlp.net.0.proj": (f, d),
        "img_mlp.net.2": (d, f),
        "txt_mlp.net.0.proj": (f, d),
        "txt_mlp.net.2": (d, f),
    }
    for i in range(config.num_layers):
        p = f"transformer_blocks.{i}."
        for module in _BLOCK_LINEAR_MODULES:
            w = linear_shapes.get(module, (d, d))
            shapes[f"{p}{module}.weight"] = w
            shapes[f"{p}{module}.bias"] = (w[0],)
        for norm in _BLOCK_NORMS:
            shapes[f"{p}{norm}.weight"] = (config.attention_head_dim,)
    if marker:
        shapes[MARKER_EDIT_2511] = (0,)
    return dict(sorted(shapes.items()))


def parameter_count(shapes: Iterable[tuple]) -> int:
    total = 0
    for shape in shapes:
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


# ---------------------------------------------------------------- detection

# A few other architectures' tell-tale keys, so the error can say what it found.
_OTHER_ARCHITECTURES = (
    ("double_blocks.0.img_attn.qkv.weight", "FLUX (BFL layout)"),
    ("single_transformer_blocks.0.attn.to_q.weight", "FLUX (diffusers layout)"),
    ("joint_blocks.0.x_block.attn.qkv.weight", "SD3 (SAI layout)"),
    ("transformer_blocks.0.ff_context.net.0.proj.weight", "SD3/AuraFlow (diffusers layout)"),
    ("input_blocks.0.0.weight", "Stable Diffusion 1.x/XL UNet"),
    ("down_blocks.0.resnets.0.conv1.weight", "a diffusers UNet"),
    ("blocks.0.self_attn.q.weight", "Wan"),
    ("model.layers.0.self_attn.q_proj.weight", "a language model"),
    ("encoder.down.0.block.0.conv1.weight", "a VAE"),
)


def detect(names: Iterable[str]) -> bool:
    names = set(names)
    return all(k in names for k in DETECTION_KEYS)


def explain_not_qwen(names: Iterable[str]) -> str:
    """One sentence saying what a non-Qwen-Image key set looks like instead."""
    names = sorted(names)
    name_set = set(names)
    if any(n.endswith((".qweight", ".proj_down")) for n in names[:5000]):
        return ("an SVDQuant (Nunchaku) file, already quantized to 4 bits: convert from the BF16 original "
                "(qconvert verify and inspect read this file)")
    guess = next((arch for key, arch in _OTHER_ARCHITECTURES
                  if key in name_set or any(n.endswith("." + key) for n in names[:5000])), None)
    missing = [k for k in DETECTION_KEYS if k not in name_set]
    sample = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    what = f"it looks like {guess}" if guess else f"its keys start {sample or '(no tensors)'}"
    return (f"not a Qwen-Image transformer: {len(names)} tensors, {what}; "
            f"missing Qwen-Image keys {', '.join(missing)}")


def config_from_shapes(shapes: Mapping[str, tuple], where: str = "checkpoint") -> QwenImageConfig:
    """Infer the config when no config.json is at hand (single-file checkpoints)."""
    d, in_ch = _dims(shapes, "img_in.weight", 2, where)
    _, t = _dims(shapes, "txt_in.weight", 2, where)
    (head_dim,) = _dims(shapes, "transformer_blocks.0.attn.norm_q.weight", 1, where)
    out = _dims(shapes, "proj_out.weight", 2, where)[0]
    blocks = {info.block for n in shapes if (info := _known(n)) and info.block is not None}
    stray = next((n for n in shapes if n.startswith("transformer_blocks.") and _known(n) is None
                  and (m := re.match(r"transformer_blocks\.(\d+)\.", n)) and len(m.group(1)) > 3), None)
    if stray:
        raise CheckpointError(f"{where}: tensor {untrusted.shown(stray)} names a block beyond the "
                              f"{MAX_LAYERS} qconvert accepts; the file is corrupt or not Qwen-Image")
    layers = max(blocks) + 1 if blocks else 0
    if not 0 < head_dim <= d or d % head_dim:
        raise CheckpointError(f"{where}: cannot infer the Qwen-Image config: inner dim {d} is not a multiple of "
                              f"head dim {head_dim}")
    for name, value in (("inner dim", d), ("text dim", t), ("input channels", in_ch), ("output size", out)):
        if not 0 < value <= MAX_WIDTH:
            raise CheckpointError(f"{where}: cannot infer the Qwen-Image config: {name} {value:,} is out of range "
                                  f"(1 to {MAX_WIDTH:,})")
    patch = 2
    return validated(QwenImageConfig(
        num_layers=layers,
        num_attention_heads=d // head_dim,
        attention_head_dim=head_dim,
        joint_attention_dim=t,
        in_channels=in_ch,
        out_channels=max(out // (patch * patch), 1),
        patch_size=patch,
        axes_dims_rope=default_axes_dims(head_dim),
        zero_cond_t=MARKER_EDIT_2511 in shapes,
        use_additional_t_cond=ADDITION_T_EMBEDDING in shapes,
        use_layer3d_rope=ADDITION_T_EMBEDDING in shapes,
    ), where)


def _dims(shapes: Mapping[str, tuple], name: str, rank: int, where: str) -> tuple:
    if name not in shapes:
        raise CheckpointError(f"{where}: cannot infer the Qwen-Image config: tensor {name} is missing")
    shape = tuple(shapes[name])
    if len(shape) != rank:
        raise CheckpointError(f"{where}: tensor {name} has shape {list(shape)}; a Qwen-Image has "
                              f"{rank} dimension(s) there")
    return shape


def _known(name: str) -> TensorInfo | None:
    try:
        return _describe(name)
    except KeyError:
        return None


def default_axes_dims(head_dim: int) -> tuple:
    """RoPE axes (frame, height, width) summing to head_dim; (16, 56, 56) for 128."""
    frame = max(2, head_dim // 8 // 2 * 2)
    rest = head_dim - frame
    return (frame, rest // 2, rest - rest // 2)


def variant(config: QwenImageConfig, names: Iterable[str]) -> str:
    """Qwen-Image, -Edit and -Edit-2509 share weights and config, so they read as one."""
    names = set(names)
    if config.use_additional_t_cond or ADDITION_T_EMBEDDING in names:
        return "qwen-image-layered"
    if config.zero_cond_t or MARKER_EDIT_2511 in names:
        return "qwen-image-edit-2511"
    return "qwen-image"


def edits(config: QwenImageConfig, pipeline: str | None) -> bool:
    """An Edit model (denoising beside reference images): Edit-2511's config says so (``zero_cond_t``); Edit
    and Edit-2509 share Qwen-Image's config and weights' names, and only their pipeline's class tells."""
    return bool(config.zero_cond_t) or (pipeline or "").startswith("QwenImageEdit")


def check_keys(config: QwenImageConfig, shapes: Mapping[str, tuple], *, allow_extra: bool = False,
               where: str = "checkpoint") -> list[str]:
    """Compare a key set with what the config implies.  Returns the extra keys (when allowed)."""
    expected = expected_shapes(config)
    missing = [k for k in expected if k not in shapes]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{where}: missing tensor(s) {', '.join(missing[:5])}{more}; "
                              "the checkpoint is incomplete (a shard missing or a truncated index?)")
    wrong = [(k, shapes[k], v) for k, v in expected.items() if tuple(shapes[k]) != v]
    if wrong:
        k, got, want = wrong[0]
        raise CheckpointError(f"{where}: tensor {k} has shape {list(got)}, expected {list(want)} "
                              f"for this config ({len(wrong)} mismatched)")
    extra = [k for k in shapes if k not in expected and k != MARKER_EDIT_2511]
    if extra and not allow_extra:
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise CheckpointError(f"{where}: unexpected tensor(s) {', '.join(extra[:5])}{more}; "
                              "pass --allow-extra to carry them through unchanged")
    return extra


def diffusers_config(source) -> str:
    """What to pass as ``config=`` to diffusers' from_single_file for a file made from ``source``: the source's
    own folder when it has one."""
    if source.layout == "diffusers":
        return str(source.path)
    return "Qwen/Qwen-Image" if source.variant == "qwen-image" else f"<the {source.variant} diffusers repo>"
