"""Output tensors made of pieces of input tensors (rows and columns of them, scaled, halves swapped, placed at
offsets): how a conversion says what it writes before reading any values, so the specs of the output are known up
front and each output tensor is built alone, with one input tensor in memory at a time."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ckpttool.model import TensorInfo


@dataclass(frozen=True)
class Piece:
    """A block of a source tensor: its rows (and columns) from..to, times a factor; `swap`: the source's two row
    halves exchanged first (BFL's final modulation against diffusers'); `transpose`: the source's two dimensions
    exchanged first (OpenCLIP's text projection against transformers'); `view`: the whole source in another shape of
    the same elements (a 1x1 convolution's weight as a linear one's)."""

    source: TensorInfo
    rows: tuple[int, int] | None = None
    cols: tuple[int, int] | None = None
    factor: float = 1.0
    swap: bool = False
    transpose: bool = False
    view: tuple | None = None

    @property
    def shape(self) -> tuple:
        if self.view is not None:
            return tuple(self.view)
        shape = list(self.source.shape[::-1] if self.transpose else self.source.shape)
        if self.rows:
            shape[0] = self.rows[1] - self.rows[0]
        if self.cols:
            shape[1] = self.cols[1] - self.cols[0]
        return tuple(shape)


@dataclass(frozen=True)
class Matrix:
    """A tensor made of pieces placed at (row, column) offsets (row only, for a vector); zeros elsewhere."""

    shape: tuple
    pieces: tuple[tuple[int, int, Piece], ...]

    @classmethod
    def of(cls, piece: Piece) -> "Matrix":
        return cls(piece.shape, ((0, 0, piece),))

    @property
    def dtype(self) -> str:
        return self.pieces[0][2].source.dtype

    def scaled(self, factor: float) -> "Matrix":
        if factor == 1:
            return self
        return Matrix(self.shape, tuple((r, c, replace(p, factor=p.factor * factor)) for r, c, p in self.pieces))


def stacked(blocks: list[tuple[int, int, Matrix]], shape: tuple) -> Matrix:
    """Matrices placed at (row, column) offsets in one of `shape`."""
    return Matrix(shape, tuple((r + r0, c + c0, p) for r0, c0, m in blocks for r, c, p in m.pieces))


def materialize(matrix: Matrix, cache: dict | None = None):
    """The matrix's values: its pieces read (one source kept in `cache` at a time, so memory stays bounded by the
    largest tensor), cut, scaled and placed."""
    import torch

    from ckpttool.tensors import load_tensor

    cache = {} if cache is None else cache
    out = None
    for r, c, piece in matrix.pieces:
        key = piece.source.name
        if key not in cache:
            cache.clear()
            cache[key] = load_tensor(piece.source)
        value = cache[key]
        if piece.swap:
            half = value.shape[0] // 2
            value = torch.cat([value[half:], value[:half]])
        if piece.transpose:
            value = value.t()
        if piece.view is not None:
            value = value.reshape(piece.view)
        if piece.rows:
            value = value[piece.rows[0]:piece.rows[1]]
        if piece.cols:
            value = value[:, piece.cols[0]:piece.cols[1]]
        if piece.factor != 1:
            value = _scaled(value, piece)
        if len(matrix.pieces) == 1 and tuple(value.shape) == tuple(matrix.shape):
            return value.contiguous()
        if out is None:
            out = torch.zeros(matrix.shape, dtype=value.dtype)
        out[(slice(r, r + value.shape[0]),) + ((slice(c, c + value.shape[1]),) if value.dim() > 1 else ())] = value
    return out


def byte_ranges(matrix: Matrix) -> list[tuple[str, int, int]] | None:
    """The matrix's bytes as (file, offset, length) ranges of its sources, in order, where it is only whole rows of
    sources stored contiguous in its dtype (a rename, a concatenation, a split, halves swapped): such an output is
    copied file to file and checked by hashing, never loaded. None where a piece needs computing."""
    ranges, row = [], 0
    for r, c, piece in sorted(matrix.pieces, key=lambda p: p[0]):
        whole = piece.source.byte_range()
        if (whole is None or c or r != row or piece.cols or piece.factor != 1 or piece.transpose
                or piece.source.dtype != matrix.dtype or tuple(piece.shape[1:]) != tuple(matrix.shape[1:])
                or piece.view is not None and (piece.rows or piece.swap)):
            return None
        path, offset, length = whole
        row_bytes = length // piece.source.shape[0]
        start, stop = piece.rows or (0, piece.source.shape[0])
        if piece.swap:
            half = piece.source.shape[0] // 2
            rows = [(start + half, stop), (start, half)] if (start, stop) == (0, 2 * half) else None
            if rows is None:
                return None
        else:
            rows = [(start, stop)]
        ranges += [(path, offset + a * row_bytes, (b - a) * row_bytes) for a, b in rows]
        row += piece.shape[0]
    return ranges if row == matrix.shape[0] else None


def _scaled(value, piece: Piece):
    """The values times the piece's factor, in their dtype; a value the dtype cannot hold after it (a finite one
    turned inf, a nonzero one turned 0) stops the conversion, nothing written."""
    import torch

    from ckpttool.errors import CkptError
    from ckpttool.model import Code

    out = (value.float() * piece.factor).to(value.dtype)
    if value.is_floating_point() and piece.factor:  # times 0 (alpha 0) is meant to be zero
        overflowed = int((torch.isinf(out) & torch.isfinite(value)).sum())
        underflowed = int(((out == 0) & (value != 0)).sum())
        if overflowed or underflowed:
            raise CkptError(Code.LOSSY_CAST, f"{piece.source.name}: times {piece.factor:g} (alpha / rank folded in), "
                            f"{overflowed} values overflow {value.dtype} to inf and {underflowed} underflow to 0; "
                            "nothing written. Convert the LoRA to float32 first (`ckpttool convert --dtype fp32`), "
                            "or keep a convention with .alpha (kohya, original, comfy)")
    return out
