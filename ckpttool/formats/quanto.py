"""optimum-quanto layouts recognised from key names, dtypes and shapes alone (nothing names the qtype in the file).

qint8 / qfloat8: `<mod>.weight._data` (int8 / float8, (out, in)) + `<mod>.weight._scale`.
qint4 / qint2: `<mod>.weight._data._data` (uint8, packed planar along dim 0) + `._scale` + `._shift`, grouped.
A `quantization_map` JSON beside the checkpoint (`quanto_qmap.json` by convention) names the qtypes exactly.
"""

from __future__ import annotations

import json
import os

from ckpttool.model import WARNING, Code

QMAP_NAMES = ("quanto_qmap.json", "quantization_map.json")
EXTRA_KEYS = (".input_scale", ".output_scale")
FLOAT8_QTYPES = {"float8_e4m3fn": "qfloat8_e4m3fn", "float8_e5m2": "qfloat8_e5m2",
                 "float8_e4m3fnuz": "qfloat8_e4m3fnuz"}


def quantized_modules(tensors) -> dict[str, dict]:
    """module name -> {"weights": qtype, "dtype": original dtype, ...} for every quanto-quantized weight."""
    by_name = {t.name: t for t in tensors}
    modules = {}
    for t in tensors:
        if t.name.endswith(".weight._data._data"):
            module = t.name[: -len(".weight._data._data")]
            scale = by_name.get(module + ".weight._scale")
            if scale is None or module + ".weight._shift" not in by_name or not t.shape or not scale.shape:
                continue
            groups = scale.shape[0]
            bits = 8 * t.shape[0] // groups if groups else 0
            qtype = {4: "qint4", 2: "qint2"}.get(bits, f"packed {bits}-bit")
            modules[module] = {"weights": qtype, "dtype": scale.dtype, "group_size": t.shape[-1] if len(t.shape) > 1
                               else None}
        elif t.name.endswith(".weight._data"):
            module = t.name[: -len(".weight._data")]
            scale = by_name.get(module + ".weight._scale")
            if scale is None:
                continue
            qtype = "qint8" if t.dtype == "int8" else FLOAT8_QTYPES.get(t.dtype, f"q{t.dtype}")
            modules[module] = {"weights": qtype, "dtype": scale.dtype}
    return modules


def quantized_key_of(name: str, modules) -> str | None:
    """The module a quanto key belongs to (its `_data`, `_scale`, `_shift`, `input_scale`, `output_scale`)."""
    for suffix in (".weight._data._data", ".weight._data", ".weight._scale", ".weight._shift") + EXTRA_KEYS:
        if name.endswith(suffix) and name[: -len(suffix)] in modules:
            return name[: -len(suffix)]
    return None


def find_qmap(path: str) -> str | None:
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    for name in (f"{stem}_quanto_qmap.json", f"{stem}.qmap.json") + QMAP_NAMES:
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def annotate(ckpt):
    """Fill `ckpt.quantization` from the tensors, refined by a quantization map beside the checkpoint."""
    found = []
    for comp in ckpt.components:
        for module, info in quantized_modules(comp.tensors).items():
            found.append({"component": comp.name, "module": module, **info})
    if not found:
        return
    qmap_path = find_qmap(ckpt.path)
    qmap = {}
    if qmap_path:
        try:
            with open(qmap_path, encoding="utf-8") as f:
                qmap = json.load(f)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            ckpt.add_problem(Code.CORRUPT, WARNING, f"quantization map is not valid JSON ({e})", qmap_path)
        if not isinstance(qmap, dict):
            qmap = {}
    for entry in found:
        mapped = qmap.get(entry["module"])
        if isinstance(mapped, dict) and isinstance(mapped.get("weights"), str):
            entry["weights"] = mapped["weights"]
            entry["qtype_source"] = "quantization map"
        else:
            entry["qtype_source"] = "inferred from dtype and shape"
    qtypes = {}
    for entry in found:
        qtypes[entry["weights"]] = qtypes.get(entry["weights"], 0) + 1
    ckpt.quantization = {"library": "optimum-quanto", "qtypes": qtypes, "modules": found, "quantization_map": qmap_path}
