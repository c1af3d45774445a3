"""Every dtype ckpttool meets, one row each: bits per element, safetensors code, the typed storage class torch.save
names for it, and what kind of number it holds. Readers, writers and operations take their dtype facts from here.
Names are torch's canonical ones (`float32`, not `float`)."""

from __future__ import annotations


class DType:
    """A plain class, not a dataclass: it is made on every start-up, and a dataclass costs a millisecond to make."""

    __slots__ = ("bits", "kind", "safetensors", "storage", "torch")

    def __init__(self, bits: int, kind: str, safetensors: str | None = None, storage: str | None = None,
                 torch: bool = True):
        self.bits = bits  # per element (a packed dtype: per stored unit)
        self.kind = kind  # float | complex | int | bool | quantized | scale (exponent only: MX block scales) | packed
        self.safetensors = safetensors  # its code in a safetensors header
        self.storage = storage  # torch's typed storage class (torch.<storage>), where it has one
        self.torch = torch  # torch has it (torch.<name>); safetensors' 6- and 4-bit floats it has not


DTYPES = {
    "bool": DType(8, "bool", "BOOL", "BoolStorage"),
    "uint8": DType(8, "int", "U8", "ByteStorage"),
    "int8": DType(8, "int", "I8", "CharStorage"),
    "int16": DType(16, "int", "I16", "ShortStorage"),
    "uint16": DType(16, "int", "U16"),
    "int32": DType(32, "int", "I32", "IntStorage"),
    "uint32": DType(32, "int", "U32"),
    "int64": DType(64, "int", "I64", "LongStorage"),
    "uint64": DType(64, "int", "U64"),
    "float16": DType(16, "float", "F16", "HalfStorage"),
    "bfloat16": DType(16, "float", "BF16", "BFloat16Storage"),
    "float32": DType(32, "float", "F32", "FloatStorage"),
    "float64": DType(64, "float", "F64", "DoubleStorage"),
    "complex32": DType(32, "complex"),
    "complex64": DType(64, "complex", "C64", "ComplexFloatStorage"),
    "complex128": DType(128, "complex", None, "ComplexDoubleStorage"),
    "float8_e4m3fn": DType(8, "float", "F8_E4M3"),
    "float8_e5m2": DType(8, "float", "F8_E5M2"),
    "float8_e4m3fnuz": DType(8, "float", "F8_E4M3FNUZ"),
    "float8_e5m2fnuz": DType(8, "float", "F8_E5M2FNUZ"),
    "float8_e8m0fnu": DType(8, "scale", "F8_E8M0"),
    "float4_e2m1fn_x2": DType(8, "packed"),  # two 4-bit floats in each byte
    "float6_e2m3": DType(6, "float", "F6_E2M3", torch=False),
    "float6_e3m2": DType(6, "float", "F6_E3M2", torch=False),
    "float4_e2m1": DType(4, "float", "F4", torch=False),
    "qint8": DType(8, "quantized", None, "QInt8Storage"),
    "quint8": DType(8, "quantized", None, "QUInt8Storage"),
    "qint32": DType(32, "quantized", None, "QInt32Storage"),
    "quint4x2": DType(8, "quantized", None, "QUInt4x2Storage"),
}

# The older names torch gives some dtypes (torch.float is torch.float32)
ALIASES = {"float": "float32", "double": "float64", "half": "float16", "long": "int64", "int": "int32",
           "short": "int16"}

BITS = {name: d.bits for name, d in DTYPES.items()}
SAFETENSORS_CODES = {d.safetensors: name for name, d in DTYPES.items() if d.safetensors}  # code -> name
SAFETENSORS_CODE_OF = {name: code for code, name in SAFETENSORS_CODES.items()}  # name -> code
STORAGE_CLASSES = {d.storage: name for name, d in DTYPES.items() if d.storage} | {"UntypedStorage": "uint8"}
# The torch.<name> dtype objects a pickle may name as plain data (a quantized dtype comes with its storage class)
TORCH_NAMES = {n for n, d in DTYPES.items() if d.torch and d.kind != "quantized"} | set(ALIASES)

# Which dtypes each operation treats as real-valued floats, by what it can do with them:
SCANNED_FOR_NONFINITE = frozenset(  # verify --finite (torch has no isfinite for complex32)
    n for n, d in DTYPES.items() if d.kind in ("float", "complex") and d.bits >= 8 and n != "complex32")
AVERAGED = frozenset(n for n, d in DTYPES.items() if d.kind == "float" and d.bits >= 8)  # average: others are taken
CAST_BY_CONVERT = frozenset(n for n, d in DTYPES.items() if d.kind == "float" and d.bits >= 16)  # convert --dtype
