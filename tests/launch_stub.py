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


def install(launch_module):
    """The C++ launch operator (``_cuda_launch``'s library) with this stub as its launch function."""
    ops = launch_module.ops()
    assert ops is not None, launch_module.unavailable_reason()
    ops.set_launch_function(ADDRESS)
    return ops


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


def decode_launches(calls, n_args: dict) -> list:
    """Triton's launcher calls (``benchmark_cpu._NoLaunch.calls``) as dicts, and each compiled
    kernel's parameter kinds set for the stub (``stub["by_function"]``). ``n_args``: kernel name
    -> (leading arguments, pointers among them)."""
    launches = []
    for launcher, args in calls:
        count, n_ptrs = n_args[launcher.name]
        bound = list(args[9:9 + count])
        kinds, kept = triton_kinds(bound)
        kept_index = [i for i in range(count) if kept[i]]
        stub["by_function"][args[4]] = ["ptr" if i < n_ptrs else k for i, k in zip(kept_index, kinds)] + ["u64", "u64"]
        launches.append(dict(name=launcher.name, function=args[4], grid=args[:3], meta=args[5], bound=bound,
                             kept_index=kept_index, n_ptrs=n_ptrs))
    return launches


def assert_launched_as(ours: dict, theirs: dict, same_pointers, what) -> None:
    """The operator's launch ``ours`` (a stub call) is Triton's ``theirs`` (from
    :func:`decode_launches`): grid, block, shared memory, no stream or extra, null scratch
    pointers, every kept parameter; a pointer in ``same_pointers`` the same address, any other
    (a fresh tensor in each) alike in 16-byte alignment. ``what`` names the case in a failure."""
    warps, ctas, shared = theirs["meta"]
    assert ours["grid"] == theirs["grid"] and ours["block"] == (32 * warps, 1, 1), (theirs["name"], ours, what)
    assert ours["shared"] == shared and ctas == 1 and ours["stream"] is None and ours["extra"] is None, what
    values, scratch = ours["values"][:-2], ours["values"][-2:]
    assert scratch == [0, 0] and len(values) == len(theirs["kept_index"]), what
    for i, v in zip(theirs["kept_index"], values):
        e = theirs["bound"][i]
        if i < theirs["n_ptrs"]:
            e = e if type(e) is int else e.data_ptr()  # the direct launch hands Triton's launcher ints
            assert (v == e) if i in same_pointers else (v % 16 == e % 16 == 0), (theirs["name"], i, what)
        elif type(e) is float:
            assert v == as_float32(e), (theirs["name"], i, v, e, what)
        else:
            assert v == e, (theirs["name"], i, v, e, what)
