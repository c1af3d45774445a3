"""The module tree a state dict's keys describe (`down_blocks.0.resnets.1.conv1.weight` lies in `down_blocks`,
`down_blocks.0`, ... `down_blocks.0.resnets.1.conv1`), in model order: the order the keys first name each module.

A key's module is everything before its last dot, except an optimum-quanto key (`linear_1.weight._data`), whose
module is the quantized module itself (`linear_1`). Used by `inspect --modules`, and wherever something is summed per
module.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ckpttool.formats.quanto import quantized_key_of


def module_of(key: str, quantized: dict | None = None) -> str:
    """The module a key belongs to ("" for a top-level key such as `step` or `logit_scale`)."""
    if quantized:
        module = quantized_key_of(key, quantized)
        if module is not None:
            return module
    return key.rpartition(".")[0]


def ancestors(module: str) -> list[str]:
    """`a.b.c` -> ["a", "a.b", "a.b.c"]; "" (the root) -> []."""
    parts = module.split(".") if module else []
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


@dataclass
class Node:
    name: str
    tensors: int = 0
    parameters: int = 0
    bytes: int = 0
    dtypes: Counter = field(default_factory=Counter)

    @property
    def depth(self) -> int:
        return self.name.count(".") + 1 if self.name else 0


def tree(tensors, quantized: dict | None = None) -> dict[str, Node]:
    """{module: Node} for the root ("") and every module the keys name, in model order, each summing the tensors
    under it."""
    nodes: dict[str, Node] = {"": Node("")}
    for t in tensors:
        for name in [""] + ancestors(module_of(t.name, quantized)):
            node = nodes.get(name)
            if node is None:
                node = nodes[name] = Node(name)
            node.tensors += 1
            node.parameters += t.numel
            node.bytes += t.nbytes
            node.dtypes[t.dtype] += 1
    return nodes
