"""A minimal ONNX model writer: just the protobuf messages an inference graph needs.

onnxruntime loads a model from bytes; writing those bytes ourselves (the ONNX schema's field numbers
are stable) spares the ``onnx`` package (tens of MB) for the one thing we use it for. Only what
:mod:`membuilder.embed.fast_e5` builds is supported: float32/int8/uint8/int64 initialisers, nodes with int,
float and int-list attributes, float32 inputs and outputs with named or fixed dimensions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Graph"]

_FLOAT, _UINT8, _INT8, _INT64 = 1, 2, 3, 7  # TensorProto.DataType
_ATTR_FLOAT, _ATTR_INT, _ATTR_INTS = 1, 2, 7  # AttributeProto.AttributeType
_IR_VERSION = 8


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(num: int, wire: int) -> bytes:
    return _varint((num << 3) | wire)


def _int(num: int, value: int) -> bytes:
    return _key(num, 0) + _varint(value)


def _bytes(num: int, value: bytes) -> bytes:
    return _key(num, 2) + _varint(len(value)) + value


def _str(num: int, value: str) -> bytes:
    return _bytes(num, value.encode("utf-8"))


def _float(num: int, value: float) -> bytes:
    return _key(num, 5) + np.float32(value).tobytes()


def _tensor(name: str, array: np.ndarray) -> bytes:
    dtype = {"float32": _FLOAT, "uint8": _UINT8, "int8": _INT8, "int64": _INT64}.get(array.dtype.name)
    if dtype is None:
        raise TypeError(f"unsupported initialiser dtype {array.dtype}")
    msg = b"".join(_int(1, d) for d in array.shape)
    msg += _int(2, dtype) + _str(8, name)
    return msg + _bytes(
        9, np.ascontiguousarray(array).astype("<" + array.dtype.str[1:], copy=False).tobytes()
    )


def _attribute(name: str, value: object) -> bytes:
    if isinstance(value, int):  # bool is an int
        return _str(1, name) + _int(3, int(value)) + _int(20, _ATTR_INT)
    if isinstance(value, float):
        return _str(1, name) + _float(2, value) + _int(20, _ATTR_FLOAT)
    if isinstance(value, (list, tuple)):
        return _str(1, name) + b"".join(_int(8, int(v)) for v in value) + _int(20, _ATTR_INTS)
    raise TypeError(f"unsupported attribute {name}={value!r}")


def _value_info(name: str, dims: Sequence[int | str]) -> bytes:
    shape = b"".join(_bytes(1, _int(1, d) if isinstance(d, int) else _str(2, d)) for d in dims)
    tensor_type = _int(1, _FLOAT) + _bytes(2, shape)
    return _str(1, name) + _bytes(2, _bytes(1, tensor_type))


@dataclass
class Graph:
    """Accumulates nodes and initialisers; :meth:`model_bytes` serialises a ``ModelProto``."""

    name: str
    _nodes: list[bytes] = field(default_factory=list)
    _inits: list[bytes] = field(default_factory=list)
    _count: int = 0

    def const(self, name: str, array: np.ndarray) -> str:
        self._inits.append(_tensor(name, array))
        return name

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        *,
        domain: str = "",
        out: str | None = None,
        **attrs: object,
    ) -> str:
        """Add one node with a single output; returns the output's name."""
        self._count += 1
        output = out or f"{op_type.lower()}_{self._count}"
        msg = b"".join(_str(1, i) for i in inputs) + _str(2, output) + _str(3, f"n{self._count}")
        msg += _str(4, op_type)
        msg += b"".join(_bytes(5, _attribute(k, v)) for k, v in attrs.items())
        if domain:
            msg += _str(7, domain)
        self._nodes.append(msg)
        return output

    def model_bytes(
        self,
        inputs: Sequence[tuple[str, Sequence[int | str]]],
        outputs: Sequence[tuple[str, Sequence[int | str]]],
        opsets: dict[str, int],
    ) -> bytes:
        graph = b"".join(_bytes(1, n) for n in self._nodes) + _str(2, self.name)
        graph += b"".join(_bytes(5, t) for t in self._inits)
        graph += b"".join(_bytes(11, _value_info(n, d)) for n, d in inputs)
        graph += b"".join(_bytes(12, _value_info(n, d)) for n, d in outputs)
        model = _int(1, _IR_VERSION)
        model += b"".join(
            _bytes(8, (_str(1, dom) if dom else b"") + _int(2, ver)) for dom, ver in opsets.items()
        )
        return model + _bytes(7, graph)
