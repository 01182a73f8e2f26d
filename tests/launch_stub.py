"""The C++ launch operator's tests' stand-in for the CUDA driver's cuLaunchKernel, imported by
their child processes (``test_cuda_launch.py``, ``test_cuda_launch_gated.py``): it records what
each launch is handed, decoded by Triton's own rule for which arguments a compiled kernel takes,
and can write numbers where the kernel would (``stub["write"]``)."""

import ctypes
import struct

P = ctypes.c_void_p
LAUNCH = ctypes.CFUNCTYPE(ctypes.c_int, P, *[ctypes.c_uint] * 7, P, ctypes.POINTER(P), P)
# expected: the parameters' kinds where no kernel's are known; by_function: by compiled kernel
stub = dict(expected=None, calls=[], write=None, by_function={})


def read(address, kind):
    if kind in ("ptr", "u64"):
        return ctypes.c_uint64.from_address(address).value
    if kind == "i32":
        return ctypes.c_int32.from_address(address).value
    if kind == "i64":
        return ctypes.c_int64.from_address(address).value
    return struct.unpack("f", ctypes.string_at(address, 4))[0]


def launched(function, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
    kinds = stub["by_function"].get(function, stub["expected"])  # by kernel, where known
    values = [read(params[i], kind) for i, kind in enumerate(kinds)]
    stub["calls"].append(dict(function=function, grid=(gx, gy, gz), block=(bx, by, bz), shared=shared,
                              stream=stream, extra=extra, values=values))
    if stub["write"] is not None:
        stub["write"](function, values)
    return 0


callback = LAUNCH(launched)
ADDRESS = ctypes.cast(callback, P).value  # what the operator's set_launch_function takes


def triton_kinds(bound):
    """Triton's rule: an absent tensor and an integer equal to 1 become constants and are not
    passed; a pointer is 8 bytes, an integer 4 in int32's range else 8, a float 4."""
    kinds, kept = [], []
    for a in bound:
        if a is None or (type(a) is int and a == 1):
            kept.append(False)
            continue
        kept.append(True)
        if type(a) is float:
            kinds.append("f32")
        elif -2**31 <= a < 2**31:
            kinds.append("i32")
        else:
            kinds.append("i64")
    return kinds, kept


def as_float32(value: float) -> float:
    """``value`` as a float parameter is packed (4 bytes) and read back."""
    return struct.unpack("f", struct.pack("f", value))[0]
