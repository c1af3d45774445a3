"""optimum-quanto (de)quantization of single modules, done by optimum-quanto's own module classes.

A plain weight is quantized by building the matching `torch.nn.Linear`/`Conv2d`, quantizing and freezing it with
`optimum.quanto`; a quantized one is dequantized by loading its keys into the matching quanto module and calling
`dequantize()` on its weight. No quantization maths is re-implemented here.
"""

from __future__ import annotations

from ckpttool.errors import CkptError
from ckpttool.model import Code

WEIGHT_KEYS = ("weight._data._data", "weight._data", "weight._scale", "weight._shift")
SCALE_KEYS = ("input_scale", "output_scale")


def _plain_module(shape, bias: bool, dtype):
    import torch

    if len(shape) == 2:
        return torch.nn.Linear(shape[1], shape[0], bias=bias, dtype=dtype)
    if len(shape) in (3, 4, 5):
        conv = {3: torch.nn.Conv1d, 4: torch.nn.Conv2d, 5: torch.nn.Conv3d}[len(shape)]
        return conv(shape[1], shape[0], kernel_size=tuple(shape[2:]), bias=bias, dtype=dtype)
    raise CkptError(Code.CORRUPT, f"cannot (de)quantize a weight of shape {list(shape)}: only Linear and Conv weights")


def _holder(module):
    import torch

    holder = torch.nn.Module()
    holder.m = module
    return holder


def quantize_module(weight, bias, weights_qtype: str, activations_qtype: str | None = None) -> dict:
    """The state dict optimum-quanto saves for a Linear/Conv with this weight (and bias), frozen."""
    import torch
    from optimum.quanto import freeze, qtypes, quantize

    if weights_qtype not in qtypes:
        raise CkptError(Code.CORRUPT, f"unknown optimum-quanto qtype {weights_qtype!r}; known: {', '.join(qtypes)}")
    module = _plain_module(tuple(weight.shape), bias is not None, weight.dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
        if bias is not None:
            module.bias.copy_(bias)
    holder = _holder(module)
    activations = qtypes[activations_qtype] if activations_qtype not in (None, "none") else None
    quantize(holder, weights=qtypes[weights_qtype], activations=activations)
    freeze(holder)
    return {k: v.detach().clone() for k, v in holder.m.state_dict().items()}


def dequantize_module(state: dict, weights_qtype: str, shape, dtype):
    """The plain weight of a quantized module, from its keys (`weight._data`, `weight._scale`, ...)."""
    import torch
    from optimum.quanto import qtypes, quantize

    module = _plain_module(tuple(shape), "bias" in state, dtype)
    holder = _holder(module)
    quantize(holder, weights=qtypes[weights_qtype])
    missing = [k for k in state if k not in ("bias",) + SCALE_KEYS + WEIGHT_KEYS]
    if missing:
        raise CkptError(Code.CORRUPT, f"unexpected keys for a quantized module: {missing}")
    load = dict(state)
    for key in SCALE_KEYS:
        load.setdefault(key, torch.ones(()))
    try:
        holder.m.load_state_dict(load, strict=False, assign=True)
        weight = holder.m.weight
        return weight.dequantize().to(dtype).contiguous() if hasattr(weight, "dequantize") else weight.detach()
    except (RuntimeError, ValueError, AssertionError) as e:
        raise CkptError(Code.CORRUPT, f"optimum-quanto could not rebuild the {weights_qtype} weight of shape "
                        f"{list(shape)} ({e})") from None


def module_inputs(module: str, info: dict, tensors: dict) -> dict:
    """{key relative to the module ("weight._data", "weight._scale", "bias", ...): tensor} of the quanto-quantized
    `module` (its entry from formats.quanto.quantized_modules) among `tensors` ({full name: tensor})."""
    from ckpttool.formats.quanto import quantized_key_of

    inputs = {k[len(module) + 1:]: v for k, v in tensors.items() if quantized_key_of(k, {module: info}) == module}
    if f"{module}.bias" in tensors:
        inputs["bias"] = tensors[f"{module}.bias"]
    return inputs


def infer_weight_shape(module: str, tensors: dict):
    """The original weight shape of a quantized module: the 8-bit `_data` shape, or for packed qint4/qint2
    (groups x group size) the bias length as out_features. None when it cannot be known from the file alone."""
    data = tensors.get(f"{module}.weight._data")
    if data is not None:
        return tuple(data.shape)
    packed, scale, bias = (tensors.get(f"{module}.weight._data._data"), tensors.get(f"{module}.weight._scale"),
                           tensors.get(f"{module}.bias"))
    if packed is None or scale is None or bias is None or not bias.shape:
        return None
    numel = scale.shape[0] * packed.shape[-1]
    out = bias.shape[0]
    return (out, numel // out) if numel % out == 0 else None
