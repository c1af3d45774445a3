"""LoRA files moved between key conventions (`remap --to diffusers|kohya|original|comfy`) with every module's
update (up @ down x alpha / rank) kept: exactly, except where alpha / rank is folded into a diffusers file's weights
and is not a power of two (rounded once in the file's dtype, as diffusers rounds a kohya file it loads).

A file is read into one form, each module named as diffusers' model names it (the component, `unet`,
`transformer`, `text_encoder`, `text_encoder_2`, and the module path inside it), and written out in the target's
names: kohya's `lora_unet_` / `lora_te*_` with underscores (the family's own UNet names: diffusers' for SD1/SD2,
which sd-scripts trains on, SGM's for SDXL, BFL's for Flux.1; either names are read), diffusers'
`<component>.<path>.lora_A/B.weight`, or the original single-file names under `diffusion_model.` (ComfyUI's own with
kohya's lora_down/lora_up). Flux.1's fused BFL modules (`qkv`, `linear1`) are split
into diffusers' q, k, v (and MLP input) and fused back: a down matrix shared by the parts stays shared; otherwise
the down matrices are concatenated and the up matrices placed block-diagonally (ranks summed), as diffusers'
`_convert_kohya_flux_lora_to_diffusers` and sd-scripts' `split_qkv` do.

alpha: kohya and the original layout keep it in `.alpha` scalars (written for every module, kohya's way; only where
it is not the rank in the original layout); diffusers' files have none, so alpha / rank is folded into the weights
there, split between down and up as diffusers does when it loads a kohya file. A fused module whose parts had
different scales gets them folded into its up blocks. Nothing is dropped: a key this cannot place stops the
conversion with its name.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

from ckpttool.conventions import flux, unet
from ckpttool.conventions.pieces import Matrix, Piece, materialize, stacked
from ckpttool.errors import CkptError, UsageError
from ckpttool.identity import adapter_metadata
from ckpttool.model import Code, TensorInfo

CONVENTIONS = ("diffusers", "kohya", "original", "comfy")
FAMILIES = ("sd1", "sd2", "sdxl", "flux.1")
MAIN = {"sd1": "unet", "sd2": "unet", "sdxl": "unet", "flux.1": "transformer"}
PAIR = re.compile(r"(.+)\.(lora_down|lora_up|lora_A|lora_B)\.weight")
ALPHA = re.compile(r"(.+)\.alpha")
OLD_DIFFUSERS = re.compile(r"[._]lora\.(?:down|up)\.weight$")
KOHYA_PREFIX = re.compile(r"lora_(unet|transformer|te\d?)_(.+)")
KOHYA_COMPONENTS = {"unet": None, "transformer": None, "te": "text_encoder", "te1": "text_encoder",
                    "te2": "text_encoder_2"}
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
# module names with underscores inside one name (diffusers' UNet, SGM's UNet, BFL's Flux, CLIP's text model):
# kohya joins every name with `_`, so these are read back as one name, never as several
NAMES = ("down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in",
         "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
         "linear_1", "linear_2", "add_embedding", "input_blocks", "middle_block", "output_blocks", "in_layers",
         "out_layers", "emb_layers", "skip_connection", "time_embed", "label_emb", "double_blocks", "single_blocks",
         "img_attn", "txt_attn", "img_mlp", "txt_mlp", "img_mod", "txt_mod", "img_in", "txt_in", "time_in",
         "vector_in", "guidance_in", "in_layer", "out_layer", "final_layer", "adaLN_modulation", "text_model",
         "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "layer_norm1", "layer_norm2", "final_layer_norm",
         "text_projection", "token_embedding", "position_embedding", "ff_context", "add_q_proj", "add_k_proj",
         "add_v_proj", "to_add_out", "norm1_context", "proj_mlp", "single_transformer_blocks", "x_embedder",
         "context_embedder", "time_text_embed", "timestep_embedder", "text_embedder", "guidance_embedder", "norm_out")
NAME_TOKENS = sorted((n.split("_") for n in NAMES), key=len, reverse=True)


@dataclass
class Module:
    """One LoRA module: its update is up @ down x scale (alpha / rank)."""

    component: str
    path: str
    down: Matrix
    up: Matrix
    scale: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class Converted:
    specs: list = field(default_factory=list)  # (name, dtype, shape)
    recipes: dict = field(default_factory=dict)  # name -> Matrix, or a float (an alpha scalar)
    changes: list = field(default_factory=list)
    family: str | None = None
    modules: int = 0


def dotted(name: str) -> str:
    """A kohya module name (every `.` made `_`) with its dots back, module names with underscores kept whole."""
    tokens, out, i = name.split("_"), [], 0
    while i < len(tokens):
        known = next((n for n in NAME_TOKENS if tokens[i:i + len(n)] == n), None)
        out.append("_".join(known) if known else tokens[i])
        i += len(known) if known else 1
    return ".".join(out)


def _scalar(info: TensorInfo) -> float:
    from ckpttool.tensors import load_tensor

    try:
        return float(load_tensor(info).item())
    except (RuntimeError, ValueError, TypeError) as e:
        raise CkptError(Code.CORRUPT, f"{info.name}: not one real number ({e})") from None


# reading: a file's keys -> modules


def _pairs(tensors: list[TensorInfo], values: dict) -> tuple[dict, dict]:
    """{module key: {"down": info, "up": info}} and {module key: alpha (a scalar tensor, or a number a `.pt` holds
    as a plain value)}; any other key stops the conversion."""
    pairs, alphas, other = {}, {}, []
    for t in tensors:
        if m := PAIR.fullmatch(t.name):
            side = "down" if m.group(2) in ("lora_down", "lora_A") else "up"
            if side in pairs.setdefault(m.group(1), {}):
                raise CkptError(Code.KEY_MISMATCH, f"{m.group(1)} has two {side} matrices (lora_A/lora_B and "
                                "lora_down/lora_up); which one counts cannot be told, nothing written")
            pairs[m.group(1)][side] = t
        elif (m := ALPHA.fullmatch(t.name)) and t.numel == 1:
            alphas[m.group(1)] = t
        else:
            other.append(t.name)
    for key, value in values.items():
        if (m := ALPHA.fullmatch(key)) and type(value) in (int, float):
            try:
                alphas[m.group(1)] = float(value)
            except OverflowError:
                raise CkptError(Code.NONFINITE, f"{key} is {str(value)[:20]}..., beyond any float: no scale to keep; "
                                "nothing written") from None
        else:
            other.append(key)
    if other:
        old = [k for k in other if OLD_DIFFUSERS.search(k)]
        if old:
            raise CkptError(Code.UNSUPPORTED_LAYOUT, f"{old[0]}: diffusers' older attention-processor names "
                            "(.lora.down / .lora.up); diffusers' lora_state_dict reads them: load the LoRA and "
                            "save_lora_weights it, then convert that file")
        raise CkptError(Code.UNSUPPORTED_LAYOUT, f"{len(other)} keys are not a LoRA's down/up matrices or alpha (e.g. "
                        f"{', '.join(other[:3])}): DoRA magnitudes, LoKr/LoHa factors, biases and other values have "
                        "no place in the other conventions, so nothing is written")
    for key, pair in pairs.items():
        if len(pair) != 2:
            raise CkptError(Code.KEY_MISMATCH, f"{key}: the LoRA module has its "
                            f"{'down' if 'down' in pair else 'up'} matrix but not the other; nothing written")
        down, up = pair["down"], pair["up"]
        if len(down.shape) < 2 or len(up.shape) < 2 or up.shape[1] != down.shape[0] or not down.shape[0]:
            raise CkptError(Code.SHAPE_MISMATCH, f"{key}: down {list(down.shape)} and up {list(up.shape)} do not "
                            "make a LoRA of rank 1 or more; nothing written")
    if stray := sorted(set(alphas) - set(pairs)):
        raise CkptError(Code.UNSUPPORTED_LAYOUT, f"{stray[0]}.alpha belongs to no LoRA module; nothing written")
    return pairs, alphas


def _alpha(value, key: str) -> float:
    number = value if isinstance(value, float) else _scalar(value)
    if not math.isfinite(number):
        raise CkptError(Code.NONFINITE, f"{key}.alpha is {number}: no scale to keep; nothing written")
    return number


def _from_original(path: str, family: str, component: str, down: TensorInfo, up: TensorInfo, scale: float,
                   key: str) -> list[Module]:
    """Modules from one module in the family's own names (BFL's Flux, SGM's UNet), split where it is fused."""
    if family == "flux.1":
        parts = flux.to_diffusers(path)
        if parts is None:
            raise CkptError(Code.KEY_MISMATCH, f"{key}: {path!r} is not a module of Flux.1's transformer")
        if path in flux.SWAPPED and up.shape[0] % 2:
            raise CkptError(Code.SHAPE_MISMATCH, f"{key}: {path} gives shift and scale, two halves, but its up matrix "
                            f"has {up.shape[0]} rows; nothing written")
        whole_down, whole_up = Matrix.of(Piece(down)), Matrix.of(Piece(up, swap=path in flux.SWAPPED))
        if len(parts) == 1:
            return [Module(component, parts[0], whole_down, whole_up, scale)]
        return _split(path, parts, down, up, scale, component, key)
    name = unet.to_diffusers(path, family)
    if name is None:
        raise CkptError(Code.KEY_MISMATCH, f"{key}: {path!r} is not a module of {family}'s UNet")
    return [Module(component, name, Matrix.of(Piece(down)), Matrix.of(Piece(up)), scale)]


def _split(path, parts, down, up, scale, component, key) -> list[Module]:
    """A fused module's update as its parts' updates: the up matrix's rows per part; the down matrix shared, or
    cut in equal ranks where the up matrix is block-diagonal (sd-scripts' split_qkv writes it so)."""
    import torch

    from ckpttool.tensors import load_tensor

    sizes = flux.part_sizes(path, down.shape[1])
    if sum(sizes) != up.shape[0]:
        raise CkptError(Code.SHAPE_MISMATCH, f"{key}: up matrix of {up.shape[0]} rows, but {path} of a Flux.1 "
                        f"transformer {down.shape[1]} wide has {sum(sizes)}; nothing written")
    rank, n = down.shape[0], len(parts)
    starts = [sum(sizes[:i]) for i in range(n)]
    block = rank // n if rank % n == 0 else None
    if block:
        values = load_tensor(up)
        block = block if all(
            not torch.any(values[s:s + size, j * block:(j + 1) * block])
            for i, (s, size) in enumerate(zip(starts, sizes)) for j in range(n) if j != i) else None
    out = []
    for i, (part, start, size) in enumerate(zip(parts, starts, sizes)):
        if block:
            cols = (i * block, (i + 1) * block)
            out.append(Module(component, part, Matrix.of(Piece(down, rows=cols)),
                              Matrix.of(Piece(up, rows=(start, start + size), cols=cols)), scale))
        else:
            out.append(Module(component, part, Matrix.of(Piece(down)),
                              Matrix.of(Piece(up, rows=(start, start + size))), scale))
    return out


def read(tensors: list[TensorInfo], convention: str, family: str, metadata: dict, values: dict) -> list[Module]:
    """The LoRA's modules in diffusers' names, from a file in `convention` (`values`: a `.pt` file's plain values)."""
    pairs, alphas = _pairs(tensors, values)
    adapter = adapter_metadata(metadata) if convention == "diffusers" else {}
    modules = []
    for key, pair in pairs.items():
        down, up = pair["down"], pair["up"]
        rank = down.shape[0]
        alpha = _alpha(alphas[key], key) if key in alphas else None
        if convention == "kohya":
            m = KOHYA_PREFIX.fullmatch(key)
            if not m or m.group(1) not in KOHYA_COMPONENTS:
                raise CkptError(Code.KEY_MISMATCH, f"{key}: not a kohya module name (lora_unet_..., lora_te_...)")
            component = KOHYA_COMPONENTS[m.group(1)] or MAIN[family]
            if component == "text_encoder_2" and family == "flux.1":
                raise CkptError(Code.UNSUPPORTED_LAYOUT, f"{key}: Flux.1's T5 text encoder has no LoRA in diffusers' "
                                "loaders; nothing written")
            path = dotted(m.group(2))
            scale = (alpha if alpha is not None else rank) / rank
            if component in ("unet", "transformer"):
                modules += _main_module(path, family, component, down, up, scale, key)
            else:
                modules.append(Module(component, path, Matrix.of(Piece(down)), Matrix.of(Piece(up)), scale))
        elif convention in ("original", "comfy"):
            if not key.startswith("diffusion_model."):
                raise CkptError(Code.KEY_MISMATCH, f"{key}: not under `diffusion_model.` as the original layout is")
            scale = (alpha if alpha is not None else rank) / rank
            modules += _from_original(key.removeprefix("diffusion_model."), family, MAIN[family], down, up, scale, key)
        else:
            component, _, path = key.partition(".")
            if component not in COMPONENTS or not path:
                raise CkptError(Code.KEY_MISMATCH, f"{key}: not under a pipeline component ({', '.join(COMPONENTS)}) "
                                "as diffusers' LoRA files are")
            if alpha is None:
                alpha = _metadata_alpha(adapter, component, path, rank)
            modules.append(Module(component, path, Matrix.of(Piece(down)), Matrix.of(Piece(up)), alpha / rank))
    return modules


# the first names of the UNet's modules in the LDM/SGM layout (sd-scripts' SDXL UNet), never in diffusers'
SGM_NAMES = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")


def _main_module(path: str, family: str, component: str, down: TensorInfo, up: TensorInfo, scale: float,
                 key: str) -> list[Module]:
    """A kohya module of the diffusion model, whichever names its trainer's model had: BFL's or diffusers' for
    Flux.1 (sd-scripts' lora_flux.py, or `lora_transformer_` from trainers on diffusers' model), SGM's or
    diffusers' for a UNet (sd-scripts trains SD1/SD2 on diffusers' names, SDXL on SGM's; other tools differ)."""
    diffusers_names = (flux.to_original(path) is not None if family == "flux.1"
                       else path.split(".")[0] not in SGM_NAMES)
    if not diffusers_names:
        return _from_original(path, family, component, down, up, scale, key)
    if (flux.to_original(path) if family == "flux.1" else unet.to_original(path, family)) is None:
        raise CkptError(Code.KEY_MISMATCH, f"{key}: {path!r} is not a module of {family}'s "
                        f"{'transformer' if family == 'flux.1' else 'UNet'}; nothing written")
    return [Module(component, path, Matrix.of(Piece(down)), Matrix.of(Piece(up)), scale)]


def _metadata_alpha(adapter: dict, component: str, path: str, rank: int) -> float:
    """A module's alpha from the LoraConfig diffusers saved with it (peft matches alpha_pattern keys as name
    suffixes, tuners_utils `get_pattern_key`); the rank (scale 1) where the file has none, as diffusers loads it."""
    pattern = adapter.get(f"{component}.alpha_pattern")
    if isinstance(pattern, dict):  # matched as a name or a dotted suffix, never run as a regular expression
        for key, value in pattern.items():
            if (path == key or path.endswith("." + str(key))) and type(value) in (int, float):
                return float(value)
    value = adapter.get(f"{component}.lora_alpha")
    return float(value) if type(value) in (int, float) else float(rank)


# writing: modules -> a file's keys


def _balanced(scale: float) -> tuple[float, float]:
    """alpha / rank split between down and up, as diffusers folds a kohya file (lora_conversion_utils.py)."""
    if not scale or not math.isfinite(scale):
        return scale, 1.0
    down, up = abs(scale), 1.0
    while down * 2 < up:
        down, up = down * 2, up / 2
    return math.copysign(down, scale), up  # a negative alpha (a slider's) keeps its sign on the down matrix


def write(modules: list[Module], convention: str, family: str) -> Converted:
    out = Converted()
    folded = fused = 0

    def put(name, recipe):
        if name in out.recipes:
            raise CkptError(Code.KEY_MISMATCH, f"two modules would both be written as {name}; nothing written")
        out.recipes[name] = recipe
        if isinstance(recipe, Matrix):
            out.specs.append((name, recipe.dtype, recipe.shape))
        else:
            out.specs.append((name, "float32", ()))

    if convention == "diffusers":
        rounded = 0
        for m in modules:
            down_factor, up_factor = _balanced(m.scale) if m.scale != 1 else (1.0, 1.0)
            folded += m.scale != 1
            rounded += not all(f == 0 or math.frexp(abs(f))[0] == 0.5 for f in (down_factor, up_factor))
            put(f"{m.component}.{m.path}.lora_A.weight", m.down.scaled(down_factor))
            put(f"{m.component}.{m.path}.lora_B.weight", m.up.scaled(up_factor))
        if folded:
            out.changes.append(f"folded alpha / rank into the weights of {folded} modules (diffusers' files carry no "
                               "alpha; the update up @ down is the same" + (
                                   f", rounded once in the file's dtype for the {rounded} whose alpha / rank is not a "
                                   "power of two, as diffusers' own reading of a kohya file rounds it" if rounded
                                   else ", exactly: every factor is a power of two") + ")")
        return out
    for component, path, down, up, scale, parts in _in_original_names(modules, family, convention):
        fused += parts > 1
        if convention == "kohya":
            base = _kohya_prefix(component, family) + path.replace(".", "_")
            put(f"{base}.lora_down.weight", down)
            put(f"{base}.lora_up.weight", up)
            put(f"{base}.alpha", scale * down.shape[0])
        else:  # original: lora_A / lora_B; comfy: ComfyUI's LoraSave names; both read `.alpha` (comfy/lora.py)
            base = f"diffusion_model.{path}"
            first, second = ("lora_down", "lora_up") if convention == "comfy" else ("lora_A", "lora_B")
            put(f"{base}.{first}.weight", down)
            put(f"{base}.{second}.weight", up)
            if scale != 1:
                put(f"{base}.alpha", scale * down.shape[0])
    if fused:
        out.changes.append(f"fused {fused} Flux.1 modules (q, k, v and the MLP input) into BFL's qkv / linear1")
    return out


def _kohya_prefix(component: str, family: str) -> str:
    if component in ("unet", "transformer"):
        return "lora_unet_"
    if component == "text_encoder":  # sd-scripts: lora.py `lora_te_` (SD1/SD2), `lora_te1_` with two encoders
        return "lora_te_" if family in ("sd1", "sd2") else "lora_te1_"  # (SDXL; Flux.1's CLIP-L, lora_flux.py)
    if family == "sdxl":
        return "lora_te2_"
    raise CkptError(Code.UNSUPPORTED_LAYOUT, f"{component}: {family}'s second text encoder has no kohya LoRA name")


def _in_original_names(modules: list[Module], family: str, convention: str):
    """(component, module path in the target's names, down, up, scale, parts fused) per written module."""
    groups: dict = {}
    for m in modules:
        if m.component in ("text_encoder", "text_encoder_2"):
            if convention in ("original", "comfy"):
                raise CkptError(Code.UNSUPPORTED_LAYOUT, f"{m.component}.{m.path}: the {convention} layout "
                                "(`diffusion_model.`) holds the diffusion model only; convert this LoRA --to kohya, "
                                "which keeps the text encoder too")
            yield m.component, m.path, m.down, m.up, m.scale, 1
            continue
        if family != "flux.1":
            name = m.path if family in ("sd1", "sd2") and convention == "kohya" else unet.to_original(m.path, family)
            if name is None:
                raise CkptError(Code.KEY_MISMATCH, f"{m.component}.{m.path}: not a module of {family}'s UNet")
            yield m.component, name, m.down, m.up, m.scale, 1
            continue
        found = flux.to_original(m.path)
        if found is None:
            raise CkptError(Code.KEY_MISMATCH, f"{m.component}.{m.path}: not a module of Flux.1's transformer")
        if found[1] in groups.setdefault(found[0], {}):
            raise CkptError(Code.KEY_MISMATCH, f"{m.component}.{m.path} and {groups[found[0]][found[1]].component}."
                            f"{m.path} would both be written as {found[0]}; nothing written")
        groups[found[0]][found[1]] = m
    for name, parts in groups.items():
        if flux.fused_parts(name) == 1:
            m = parts[0]
            if name in flux.SWAPPED and m.up.shape[0] % 2:
                raise CkptError(Code.SHAPE_MISMATCH, f"{m.component}.{m.path}: gives scale and shift, two halves, "
                                f"but its up matrix has {m.up.shape[0]} rows; nothing written")
            up = Matrix(m.up.shape, tuple((r, c, replace(p, swap=not p.swap) if name in flux.SWAPPED else p)
                                          for r, c, p in m.up.pieces))
            yield m.component, name, m.down, up, m.scale, 1
        else:
            yield (MAIN[family], name, *_fuse(name, parts), len(parts))


def _fuse(name: str, parts: dict[int, Module]) -> tuple[Matrix, Matrix, float]:
    """One fused BFL module from its diffusers parts (down, up, scale): one shared down matrix where all parts have
    it, else the downs concatenated and the ups block-diagonal; parts not in the LoRA are zero rows."""
    first = next(iter(parts.values()))
    if len({d for m in parts.values() for d in (m.down.dtype, m.up.dtype)}) > 1:
        raise CkptError(Code.DTYPE_MISMATCH, f"{name}: its parts {', '.join(m.path for m in parts.values())} hold "
                        "different dtypes, and one fused matrix has one; cast the LoRA to one dtype first (`ckpttool "
                        "convert --dtype`); nothing written")
    hidden = first.down.shape[1]
    sizes = flux.part_sizes(name, hidden)
    for i, m in parts.items():
        if m.up.shape[0] != sizes[i] or m.down.shape[1] != hidden:
            raise CkptError(Code.SHAPE_MISMATCH, f"{m.component}.{m.path}: {list(m.up.shape)} up and "
                            f"{list(m.down.shape)} down do not fit {name} of a Flux.1 transformer {hidden} wide")
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    out_rows = sum(sizes)
    shared = all(m.scale == first.scale and _same(m.down, first.down) for m in parts.values())
    if shared:
        rank = first.rank
        up = stacked([(starts[i], 0, m.up) for i, m in parts.items()], (out_rows, rank, *first.up.shape[2:]))
        return first.down, up, first.scale
    order = sorted(parts)
    ranks = [parts[i].rank for i in order]
    total = sum(ranks)
    cols = [sum(ranks[:k]) for k in range(len(order))]
    scales = {parts[i].scale for i in order}
    scale = scales.pop() if len(scales) == 1 else 1.0
    down = stacked([(cols[k], 0, parts[i].down) for k, i in enumerate(order)], (total, hidden,
                                                                               *first.down.shape[2:]))
    up = stacked([(starts[i], cols[k], parts[i].up.scaled(parts[i].scale / scale)) for k, i in enumerate(order)],
                 (out_rows, total, *first.up.shape[2:]))
    return down, up, scale


def produce(recipes: dict):
    """(name, tensor) per output, in order: pieces read, cut, scaled and placed; alphas as float32 scalars."""
    import torch

    cache: dict = {}
    for name, recipe in recipes.items():
        if isinstance(recipe, Matrix):
            yield name, materialize(recipe, cache)
        else:
            yield name, torch.tensor(float(recipe), dtype=torch.float32)


def _same(a: Matrix, b: Matrix) -> bool:
    """Whether two down matrices hold the same values (the one matrix diffusers' split copied to each part)."""
    import torch

    return a == b or (a.shape == b.shape and torch.equal(materialize(a), materialize(b)))


def family_of(modules_keys: list[str], identity: dict | None, given: str | None) -> str:
    """The family whose names the conversion uses: --family, else the identity's, else the UNet's structure (SD1
    and SD2 share one); a usage error where none tells."""
    if given:
        return given
    family = (identity or {}).get("family")
    if family in FAMILIES:
        return family
    text = " ".join(modules_keys)
    if re.search(r"double_blocks|single_blocks|single_transformer_blocks", text):
        return "flux.1"
    if re.search(r"down_blocks[._]3|up_blocks[._]3|down_blocks[._]0[._]attentions|"
                 r"input_blocks[._](?:1|2|9|10|11)[._]1", text):
        return "sd1"  # four down blocks, attention in the first: SD1's or SD2's UNet, converted alike
    if re.search(r"up_blocks[._]0[._]attentions|lora_te2_|text_encoder_2\.|output_blocks[._][012][._]1", text):
        return "sdxl"
    raise UsageError("cannot tell which model family this LoRA is for from its keys; pass --family "
                     f"{'|'.join(FAMILIES)}")


def convert(tensors: list[TensorInfo], metadata: dict, identity: dict | None, to: str, family: str | None,
            src: str, values: dict | None = None) -> Converted:
    """The LoRA in `tensors` written in convention `to` (`values`: the plain values a `.pt` file holds beside its
    tensors, by key)."""
    source = (identity or {}).get("convention")
    if (identity or {}).get("kind") != "lora" or source not in CONVENTIONS:
        what = "not a LoRA" if (identity or {}).get("kind") != "lora" else f"in the {source or 'unknown'} convention"
        raise UsageError(f"{src}: {what}; --to {to} moves LoRA files between {', '.join(CONVENTIONS)} conventions "
                         "(`ckpttool inspect` says what the file is)")
    family = family_of([t.name for t in tensors], identity, family)
    modules = read(tensors, source, family, metadata, values or {})
    out = write(modules, to, family)
    out.family, out.modules = family, len(modules)
    out.changes.insert(0, f"{len(modules)} modules, {source} -> {to} ({family})")
    return out
