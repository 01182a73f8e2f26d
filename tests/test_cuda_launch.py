"""The C++ launch operator (``_cuda_launch``, ``HF_RMSNORM_CPP_LAUNCH=1``) must launch the
compiled kernel Triton's launcher would launch, with the same grid, block, shared memory and
parameters, and its autograd node must hand the backward the tensors of the forward.

On a CPU machine the kernels are compiled for sm_90 and launches do nothing
(``benchmark_cpu.triton_without_gpu``), in a child process (the kernels must be defined
compiled); the operator's launch function is a stub in Python that records what it is handed,
decoded by Triton's own rule for which arguments a compiled kernel takes (an absent tensor and
an integer equal to 1 are constants), and, for the numeric checks, writes the float64
reference's outputs where the kernel would. Whether the launched kernel computes the same bits
on a GPU is the GPU suite's part (``test_gpu.py::test_cpp_launch_computes_the_same_bits``).
"""

from __future__ import annotations

import textwrap

import pytest

from conftest import run_operator_child
from hf_rmsnorm.ops import _cpu_kernel

_CHILD = textwrap.dedent('''
    with triton_without_gpu():
        from hf_rmsnorm.ops import _cuda_launch as C, _module_calls, _norm, layer_norm, rms_norm
        from hf_rmsnorm.ops.layer_norm import layer_norm_ref
        from hf_rmsnorm.ops.rms_norm import rms_norm_ref
        from triton import knobs

        ops = install(C)

        def inputs(m, n, dtype=torch.bfloat16, w_dtype=None, start=0, lead=()):
            flat = torch.randn(start + math.prod(lead) * m * n, dtype=dtype)
            x = flat[start:].view(*lead, m, n).detach().requires_grad_(True)
            w = torch.randn(n + start, dtype=w_dtype or dtype)[start:].detach().requires_grad_(True)
            b = torch.randn(n, dtype=w_dtype or dtype, requires_grad=True)
            return x, w, b

        cases = [
            ("rms", inputs(16, 1024), False, 0.0),
            ("rms", inputs(16, 1024, start=1), False, 0.0),  # x not 16-byte aligned
            ("rms", inputs(16, 1000), False, 0.0),  # N not divisible by 16
            ("rms", inputs(16, 1024, w_dtype=torch.float32), False, 0.0),
            ("rms", inputs(16, 1024), False, 1.0),
            ("rms", inputs(16, 1024), True, 0.0),
            ("layer", inputs(16, 1024), True, 0.0),
            ("layer", inputs(1, 1024), True, 0.0),  # M = 1: a constant
            ("layer", inputs(17, 768, dtype=torch.float16), True, 0.0),
            ("layer", inputs(4, 512, dtype=torch.float32, lead=(3,)), True, 0.0),  # 3-D rows
            ("rms", inputs(8192, 64), False, 0.0),  # rows enough for the many-rows tiles
        ]

        def call(kind, x, w, b, with_bias, offset):
            fn = rms_norm if kind == "rms" else layer_norm
            return fn(x, w, *((b,) if with_bias else ()), offset=offset)

        def expect(kind, x, w, b, with_bias, offset):
            """What Triton's launcher is handed for this call on the Python path (its second
            call, launched directly); sets the stub's expected parameter kinds."""
            C.cpu_stub = False
            call(kind, x, w, b, with_bias, offset)
            _NoLaunch.calls = []
            call(kind, x, w, b, with_bias, offset)
            (launcher, args), = _NoLaunch.calls
            _NoLaunch.calls = None
            bound = list(args[9:20])
            kinds, kept = triton_kinds(bound)
            kept_index = [i for i in range(11) if kept[i]]
            stub["expected"] = ["ptr" if i < 6 else k for i, k in zip(kept_index, kinds)] + ["u64", "u64"]
            C.cpu_stub = True
            return args, bound, kept_index

        checked = 0
        for kind, (x, w, b), with_bias, offset in cases:
            args, bound, kept_index = expect(kind, x, w, b, with_bias, offset)
            gx, gy, gz, stream, function, (warps, ctas, shared) = args[:6]
            # the operator: the first call of a kind of call registers its plan from the Python path
            stub["calls"] = []
            launches = C.launches()
            y = call(kind, x, w, b, with_bias, offset)
            if not stub["calls"]:
                assert C.launches() == launches
                y = call(kind, x, w, b, with_bias, offset)
            (got,) = stub["calls"]
            assert C.launches() == launches + 1
            assert got["function"] == function and got["grid"] == (gx, gy, gz), (got, function, gx)
            assert got["block"] == (32 * warps, 1, 1) and got["shared"] == shared and ctas == 1, (got, warps, shared)
            assert got["stream"] is None and got["extra"] is None
            expected = [bound[i] for i in kept_index]
            values, scratch = got["values"][:-2], got["values"][-2:]
            assert scratch == [0, 0]
            for i, v, e in zip(kept_index, values, expected):
                if i in (1, 4, 5):  # y, mean, rstd: fresh tensors, alike in alignment
                    assert v % 16 == e % 16 == 0 or (v % 16 and e % 16), (i, v, e)
                elif type(e) is float:
                    assert v == as_float32(e), (i, v, e)
                else:
                    assert v == e, (kind, i, v, e)
            assert values[kept_index.index(1)] == y.data_ptr()
            assert type(y.grad_fn).__name__ == "CppFunction" and y.grad_fn.name() == "HFNormBackward"
            checked += 1
        print("operator launches checked:", checked, "plans:", ops.plan_count())

        # Numbers: the stub writes the float64 reference's y, mean and rstd where the kernel
        # would; the node must return that y and hand the backward the same x, weight, bias,
        # mean and rstd, and give each input its gradient.
        def reference(kind, x, w, b, offset, eps):
            xd = x.detach().double()
            mean = xd.mean(-1) if kind == "layer" else torch.zeros(xd.shape[:-1], dtype=torch.float64)
            xc = xd - mean[..., None]
            rstd = torch.rsqrt((xc * xc).mean(-1) + eps)
            return mean, rstd

        def writer(kind, with_bias, y_ref, mean_f, rstd_f):
            """The stub's write for a forward launch: the reference's y, mean and rstd where the
            kernel would write them."""
            def write(function, values):
                kept_ptrs = [v for v in values[:6]]  # the pointers come first, absent ones left out
                ptrs = dict(zip([i for i in range(6) if not (kind == "rms" and i == 4) and (with_bias or i != 3)],
                                kept_ptrs))
                # (the sources held in names: a temporary's memory is freed before memmove reads it)
                for index, source in ((1, y_ref), (4, mean_f), (5, rstd_f)):
                    if index in ptrs:
                        ctypes.memmove(ptrs[index], source.data_ptr(), source.numel() * source.element_size())
            return write

        def numbers(kind, x, w, b, with_bias, offset, eps, wants):
            ref_fn = rms_norm_ref if kind == "rms" else layer_norm_ref
            params = (w, b) if with_bias else (w,)
            y_ref = ref_fn(x.detach().double(), *(p.detach().double() for p in params), eps=eps, offset=offset)
            y_ref = y_ref.to(x.dtype)
            mean, rstd = reference(kind, x, w, b, offset, eps)
            mean_f, rstd_f = mean.float().contiguous(), rstd.float().contiguous()
            saved = {{}}
            write = writer(kind, with_bias, y_ref, mean_f, rstd_f)

            def backward(dy, x_, w_, b_, mean_, rstd_, offset_, is_rms, rounding):
                saved.update(x=x_, w=w_, b=b_, mean=mean_, rstd=rstd_, offset=offset_, is_rms=is_rms)
                with torch.enable_grad():  # the engine runs a backward without
                    inputs = [t.detach().double().requires_grad_(True) for t in (x_, w_) + ((b_,) if b_ is not None else ())]
                    out = ref_fn(*inputs, eps=eps, offset=offset)
                    grads = torch.autograd.grad(out, inputs, dy.double())
                dx, dw, db = (*(g.to(t.dtype) for g, t in zip(grads, (x_, w_, b_))), None, None)[:3]
                return dx, dw, db

            x.requires_grad_(wants[0]); w.requires_grad_(wants[1]); b.requires_grad_(wants[2])
            expect(kind, x, w, b, with_bias, offset)
            stub["calls"], stub["write"] = [], write
            y = call(kind, x, w, b, with_bias, offset)
            if not stub["calls"]:
                y = call(kind, x, w, b, with_bias, offset)
            stub["write"] = None
            assert stub["calls"], "the operator did not launch"
            assert torch.equal(y, y_ref), (y - y_ref).abs().max()
            dy = torch.randn_like(y)
            inputs = [t for t, want in zip((x, w, b), wants) if want and (with_bias or t is not b)]
            real = _norm._bwd_impl
            _norm._bwd_impl = backward
            try:
                grads = torch.autograd.grad(y, inputs, dy)
            finally:
                _norm._bwd_impl = real
            assert saved["x"].data_ptr() == x.data_ptr() and saved["w"].data_ptr() == w.data_ptr()
            assert (saved["b"].data_ptr() == b.data_ptr()) if with_bias else saved["b"] is None
            assert saved["is_rms"] == (kind == "rms") and saved["offset"] == offset
            assert (saved["mean"] is None) if kind == "rms" else torch.equal(saved["mean"], mean_f)
            assert torch.equal(saved["rstd"], rstd_f)
            ref_inputs = [t.detach().double().requires_grad_(True) for t in (x, w) + ((b,) if with_bias else ())]
            ref_out = ref_fn(*ref_inputs, eps=eps, offset=offset)
            ref_grads = torch.autograd.grad(ref_out, ref_inputs, dy.double())
            ref_wanted = [g.to(t.dtype) for g, t, want in zip(ref_grads, (x, w, b), wants) if want]
            assert len(grads) == len(ref_wanted)
            for g, r in zip(grads, ref_wanted):
                assert torch.equal(g, r), (g - r).abs().max()
            # create_graph=True: the node's gradients as a graph of the torch reference, whose
            # second derivative must be the float64 reference's
            if wants[0] and wants[1]:
                y = call(kind, x, w, b, with_bias, offset)
                (gx,) = torch.autograd.grad(y, (x,), dy, create_graph=True)
                v = torch.randn_like(gx)
                (gw,) = torch.autograd.grad((gx.float() * v.float()).sum(), (w,))
                xd, wd = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
                bd = (b.detach().double(),) if with_bias else ()
                (gxd,) = torch.autograd.grad(ref_fn(xd, wd, *bd, eps=eps, offset=offset), (xd,), dy.double(),
                                             create_graph=True)
                (gwd,) = torch.autograd.grad((gxd * v.double()).sum(), (wd,))
                torch.testing.assert_close(gw.double(), gwd, rtol=2e-2, atol=2e-2 * gwd.abs().max().item())

        torch.manual_seed(0)
        for kind, (x, w, b), with_bias, offset, wants in (
            ("layer", inputs(16, 1024, dtype=torch.float32), True, 0.0, (True, True, True)),
            ("rms", inputs(16, 1024, dtype=torch.float32), False, 1.0, (True, True, False)),
            ("rms", inputs(16, 1024, dtype=torch.float32), True, 0.0, (True, False, True)),  # a frozen weight
            ("layer", inputs(16, 1024, dtype=torch.float32), True, 0.0, (False, True, True)),  # x needs none
        ):
            numbers(kind, x, w, b, with_bias, offset, 1e-5, wants)
        print("operator numbers checked")

        # The backward: after a call that registers its plans, the node launches the backward
        # kernel and the partial sums itself, as Triton's launcher is handed them on the Python
        # path, and returns the tensors it launched on as the gradients. The stub writes float64
        # reference gradients where the kernels would (dx by the backward, the parameters' by the
        # sums), so the gradients must be exactly those.
        N_ARGS = {{"_norm_fwd_kernel": (11, 6), "_norm_bwd_kernel": (12, 7), "_sum_rows_kernel": (6, 3)}}

        def python_launches(kind, x, w, b, with_bias, offset, dy):
            C.cpu_stub = False
            params = (x, w, b) if with_bias else (x, w)
            torch.autograd.grad(call(kind, x, w, b, with_bias, offset), params, dy)
            _NoLaunch.calls = []
            torch.autograd.grad(call(kind, x, w, b, with_bias, offset), params, dy)
            calls, _NoLaunch.calls = _NoLaunch.calls, None
            C.cpu_stub = True
            return decode_launches(calls, N_ARGS)

        backward_cases = [
            ("layer", inputs(16, 1024, dtype=torch.float32), True, 0.0),
            ("rms", inputs(16, 1024, dtype=torch.float32, w_dtype=torch.float32), False, 1.0),
            ("rms", inputs(333, 1000, dtype=torch.float32), True, 0.0),  # odd width, odd rows
            ("layer", inputs(1, 512, dtype=torch.float32), True, 0.0),  # one row
            ("rms", inputs(8, 256, dtype=torch.float32, lead=(2,)), True, 0.0),  # rows of rank 3
        ]
        for kind, (x, w, b), with_bias, offset in backward_cases:
            ref_fn = rms_norm_ref if kind == "rms" else layer_norm_ref
            dy = torch.randn(x.shape, dtype=x.dtype)
            python = python_launches(kind, x, w, b, with_bias, offset, dy)
            assert [l["name"] for l in python] == ["_norm_fwd_kernel", "_norm_bwd_kernel", "_sum_rows_kernel"], python
            params = (x, w, b) if with_bias else (x, w)
            xd = [t.detach().double().requires_grad_(True) for t in params]
            ref = torch.autograd.grad(ref_fn(*xd, eps=1e-5, offset=offset), xd, dy.double())
            ref = [g.to(t.dtype) for g, t in zip(ref, params)]
            bwd_fn, sum_fn = python[1]["function"], python[2]["function"]

            def write(function, values):
                # dx is the backward kernel's fourth pointer; the sums' outputs their second and third
                if function == bwd_fn:
                    ctypes.memmove(values[3], ref[0].data_ptr(), ref[0].numel() * ref[0].element_size())
                elif function == sum_fn:
                    for g, address in zip(ref[1:], values[1:3]):
                        ctypes.memmove(address, g.data_ptr(), g.numel() * g.element_size())

            for attempt in range(3):  # the forward's plan, then the backward's, then all three launched here
                stub["calls"], stub["write"] = [], write
                counts = C.launch_counts()
                grads = torch.autograd.grad(call(kind, x, w, b, with_bias, offset), params, dy)
                stub["write"] = None
                if C.launch_counts()[1] > counts[1]:
                    break
            assert [c["function"] for c in stub["calls"]] == [l["function"] for l in python], (kind, attempt)
            assert C.launch_counts() == [counts[0] + 1, counts[1] + 1, counts[2] + 1]
            for ours, theirs in zip(stub["calls"], python):
                # the same tensors where both hold them (the backward's x, weight, dy); fresh ones alike in alignment
                assert_launched_as(ours, theirs, (0, 1, 2) if theirs["name"] == "_norm_bwd_kernel" else (), kind)
            bwd_values, sum_values = stub["calls"][1]["values"], stub["calls"][2]["values"]
            assert sum_values[0] == bwd_values[4]  # the sums read the partials the backward wrote
            assert grads[0].data_ptr() == bwd_values[3]
            assert [g.data_ptr() for g in grads[1:]] == sum_values[1:len(grads)]
            for g, r in zip(grads, ref):
                assert g.dtype == r.dtype and torch.equal(g, r), (kind, (g - r).abs().max())
        print("operator backward launches checked")

        # a dy of another dtype than y's (the engine casts it to y's; only a direct call of the
        # library's backward can pass one): its plans are not learnt, the key would not tell it
        x, w, b = inputs(16, 1024)
        _, family = C.forward(layer_norm_ref, x, w, b, 1e-5, 0.0, False, 0)
        stats, plans = torch.empty(16), ops.plan_count()
        C._backward(torch.randn(16, 1024), x, w, b, stats, stats, 1e-5, 0.0, family, 7)
        assert ops.plan_count() == plans
        C._backward(torch.randn(16, 1024, dtype=torch.bfloat16), x, w, b, stats, stats, 1e-5, 0.0, family, 7)
        assert ops.plan_count() == plans + 2
        print("operator backward dtypes checked")

        # without gradients: no node; with Triton's launch hooks set: Triton's own path
        x, w, b = inputs(16, 1024, dtype=torch.float32)
        expect("layer", x, w, b, True, 0.0)
        from hf_rmsnorm.ops import _triton_norm as T

        with torch.no_grad():
            launches, counted = C.launches(), T.LAUNCHES["norm_fwd"]
            y = layer_norm(x, w, b)
            assert C.launches() == launches + 1 and y.grad_fn is None
            assert T.LAUNCHES["norm_fwd"] == counted + 1  # counted as the Python path's launches are
        knobs.runtime.launch_enter_hook.add(lambda metadata: None)
        try:
            assert not _norm._direct.plain_launches()
            launches = C.launches()
            layer_norm(x, w, b)
            assert C.launches() == launches
        finally:
            knobs.runtime.launch_enter_hook.calls.clear()
        print("operator bypasses checked")

        # saved-tensor hooks (activation offloading, non-reentrant checkpointing) see every
        # tensor the node saves: x, weight, bias, mean, rstd
        packed, unpacked = [], []
        x.requires_grad_(True)

        def pack(t):
            packed.append(t)
            return t

        def unpack(t):
            unpacked.append(t)
            return t

        launches = C.launches()
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            y = layer_norm(x, w, b)
        assert C.launches() == launches + 1 and len(packed) == 5
        real = _norm._bwd_impl
        _norm._bwd_impl = lambda dy, x_, w_, b_, *rest: (torch.zeros_like(x_), torch.zeros_like(w_), torch.zeros_like(b_))
        try:
            torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
        finally:
            _norm._bwd_impl = real
        assert len(unpacked) == 5 and [p.data_ptr() for p in packed[:3]] == [t.data_ptr() for t in (x, w, b)]
        print("operator saved-tensor hooks checked")

        # Another thread's launch recorded into the same list while this call ran: nothing is
        # learnt from the call (it would register that launch's kernel for this call's kind).
        C.cpu_stub = False
        other = inputs(16, 1024, dtype=torch.float16)
        T.record = []
        layer_norm(*other)  # a real launch of another kind of call, on other tensors
        (foreign,), T.record = T.record, None
        C.cpu_stub = True
        x, w, b = inputs(16, 1024, dtype=torch.float16, start=1)  # a kind of call not seen yet
        real_fwd = T.norm_fwd

        def with_a_foreign_record(*args, **kwargs):
            # the list as the other thread left it: its launch in, this call's own not (that
            # thread's ``finally`` cleared the global before this launch)
            mine, T.record = T.record, None
            try:
                return real_fwd(*args, **kwargs)
            finally:
                mine.append(foreign)
                T.record = mine

        plans, launches = ops.plan_count(), C.launches()
        T.norm_fwd = with_a_foreign_record
        try:
            rms_norm(x, w)
            rms_norm(x, w)
        finally:
            T.norm_fwd = real_fwd
        assert ops.plan_count() == plans and C.launches() == launches
        expect("rms", x, w, b, False, 0.0)
        rms_norm(x, w)  # learns
        rms_norm(x, w)
        assert ops.plan_count() == plans + 1 and C.launches() == launches + 1
        print("operator foreign records checked")

        # A module's calls once one has gone to the kernels: straight to the operator with the
        # family that call settled (_module_calls.kernels_settled), the general way not asked, with the
        # reference's numbers (the stub writes them). Whatever changed since sends a call the
        # general way, which settles again where the operator serves it.
        import copy
        import pickle
        import torch.autograd.forward_ad as fwAD
        from hf_rmsnorm import FusedLayerNorm, modules

        general = []
        real_general = modules.kernels_for_module

        def counted(*args, **kwargs):
            general.append(1)
            return real_general(*args, **kwargs)

        def through(module, x):
            """(y, calls the general way took, the operator's launches) for one call"""
            calls, launches = len(general), C.launches()
            y = module(x)
            return y, len(general) - calls, C.launches() - launches

        modules.kernels_for_module = counted
        torch.manual_seed(1)
        m = FusedLayerNorm(1024)
        with torch.no_grad():
            m.weight.normal_()
            m.bias.normal_()
        x = torch.randn(16, 1024, requires_grad=True)
        expect("layer", x, m.weight, m.bias, True, 0.0)  # the plan, from the functional call
        assert m._settled is None
        _, taken, _ = through(m, x)
        assert taken == 1 and m._settled is not None and m._settled[1] is _module_calls._SETTLED
        y_ref = layer_norm_ref(x.detach().double(), m.weight.detach().double(), m.bias.detach().double(), eps=m.eps)
        mean, rstd = reference("layer", x, None, None, 0.0, m.eps)
        y_ref, mean_f, rstd_f = y_ref.float(), mean.float().contiguous(), rstd.float().contiguous()
        stub["write"] = writer("layer", True, y_ref, mean_f, rstd_f)
        y, taken, launched = through(m, x)
        stub["write"] = None
        assert (taken, launched) == (0, 1) and torch.equal(y, y_ref) and y.grad_fn.name() == "HFNormBackward"
        with torch.no_grad():
            y, taken, launched = through(m, x)
        assert (taken, launched) == (0, 1) and y.grad_fn is None

        def general_way(module, x):
            y, taken, launched = through(module, x)
            assert taken == 1, "the settled call took it"
            return y, launched

        general_way(m, torch.randn(1024, 16).t())  # x not contiguous
        with torch.autocast("cpu", dtype=torch.bfloat16):
            general_way(m, x)
        with fwAD.dual_level():
            general_way(m, x)
        knobs.runtime.launch_enter_hook.add(lambda metadata: None)
        try:
            general_way(m, x)
        finally:
            knobs.runtime.launch_enter_hook.calls.clear()
        C.ENABLED = False
        assert general_way(m, x)[1] == 0 and m._settled is None  # off: settles nothing
        C.ENABLED = True
        general_way(m, x)
        assert through(m, x)[1:] == (0, 1)
        os.environ["HF_RMSNORM_BACKEND"] = "torch"
        y, taken, launched = through(m, x)  # the module's CPU shortcut: no kernel at all
        os.environ["HF_RMSNORM_BACKEND"] = "triton"
        assert (taken, launched) == (0, 0)
        torch.testing.assert_close(y, y_ref)
        mode = m.cast_mode
        m.cast_mode = "input"  # another family: found again
        general_way(m, x)
        assert m._settled[2] == "input" and through(m, x)[1:] == (0, 1)
        m.cast_mode = mode
        general_way(m, x)
        try:
            m(torch.randn(4, 512))
            raise AssertionError("a row of another width went through")
        except ValueError as e:
            assert "normalises the last dims (1024,)" in str(e), e
        # a parameter replaced by a strided view: the general way copies it for the kernels
        m.weight = torch.nn.Parameter(torch.randn(2048)[::2])
        general_way(m, x)
        # a copy holds a copy of this process's token: it settles afresh (pickled likewise, as
        # torch.save of a whole model does)
        assert pickle.loads(pickle.dumps(m))._settled[1] is not _module_calls._SETTLED
        twin = copy.deepcopy(m)
        assert twin._settled[1] is not _module_calls._SETTLED
        general_way(twin, x)
        assert twin._settled[1] is _module_calls._SETTLED and through(twin, x)[1:] == (0, 1)
        # converted to half precision: the operator refuses the old family, the general way finds the new one
        twin.half()
        x16 = x.detach().half().requires_grad_(True)
        expect("layer", x16, twin.weight, twin.bias, True, 0.0)
        before = twin._settled
        general_way(twin, x16)
        assert twin._settled != before and through(twin, x16)[1:] == (0, 1)
        # the operator itself refuses a tensor subclass, even one with memory of its own: its
        # calls are its own to see
        class Seen(torch.Tensor):
            @classmethod
            def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
                plain = lambda t: t.as_subclass(torch.Tensor) if isinstance(t, Seen) else t
                return func(*[plain(a) for a in args], **{{k: plain(v) for k, v in (kwargs or {{}}).items()}})

        seen, w = torch.Tensor._make_subclass(Seen, x.detach()), m.weight.detach().contiguous()
        launches = C.launches()
        assert C._norm_op(seen, w, m.bias, m.eps, 0.0, m._settled[0]) is None and C.launches() == launches
        assert C._norm_op(x.detach(), w, m.bias, m.eps, 0.0, m._settled[0]) is not None  # the plain tensor's call
        assert C.launches() == launches + 1
        # torch.compile traces a settled module whole, through the custom op, not the operator
        fresh = FusedLayerNorm(1024)
        fresh(x)
        assert fresh._settled is not None
        launches = C.launches()
        torch.compile(fresh, backend="eager", fullgraph=True)(x).sum().backward()
        assert C.launches() == launches
        # torch.jit.trace likewise: the operator's answer depends on its plans (None in a process
        # without them), so a trace that replays it could give None
        traced = torch.jit.trace(fresh, x.detach(), check_trace=False)
        kinds = [node.kind().split("::")[-1] for node in traced.graph.nodes()]
        assert "norm_fwd" in kinds and "norm" not in kinds and C.launches() == launches, kinds
        modules.kernels_for_module = real_general
        print("operator settled module calls checked")
''')


@pytest.mark.slow
def test_the_operator_launches_as_triton_would_and_its_node_passes_the_forwards_tensors(tmp_path):
    stdout = run_operator_child(tmp_path, _CHILD)
    assert "operator launches checked: 11" in stdout, stdout
    assert "operator numbers checked" in stdout, stdout
    assert "operator bypasses checked" in stdout, stdout
    assert "operator saved-tensor hooks checked" in stdout, stdout
    assert "operator foreign records checked" in stdout, stdout
    assert "operator backward launches checked" in stdout, stdout
    assert "operator backward dtypes checked" in stdout, stdout
    assert "operator settled module calls checked" in stdout, stdout


@pytest.mark.parametrize("value, expected", [("1", True), ("0", False), (" 1 ", True), (None, True)])
def test_the_environment_turns_the_operator_off_and_nothing_else(value, expected, monkeypatch):
    pytest.importorskip("triton")
    from hf_rmsnorm.ops import _cuda_launch

    if value is None:
        monkeypatch.delenv(_cuda_launch.CPP_LAUNCH_ENV, raising=False)
    else:
        monkeypatch.setenv(_cuda_launch.CPP_LAUNCH_ENV, value)
    assert _cuda_launch._enabled_by_environment() is expected


def test_the_environment_rejects_other_values(monkeypatch):
    pytest.importorskip("triton")
    from hf_rmsnorm.ops import _cuda_launch

    monkeypatch.setenv(_cuda_launch.CPP_LAUNCH_ENV, "yes")
    with pytest.raises(ValueError, match="HF_RMSNORM_CPP_LAUNCH='yes'.*expected 1"):
        _cuda_launch._enabled_by_environment()


@pytest.mark.skipif(_cpu_kernel._compiler() is None, reason="no C++ compiler here to build with")
@pytest.mark.slow
def test_the_operator_compiles_without_warnings(tmp_path):
    """-Wall -Wextra -Werror with torch's headers as system headers: its own warnings only."""
    pytest.importorskip("triton")
    from hf_rmsnorm.ops import _cuda_launch, _direct

    if not _direct._DIRECT_TRITON:  # e.g. torch 2.6 (Triton 3.2), whose c10::Stream lacks native_handle
        pytest.skip("the operator is not built for this Triton release at all (its reason says so)")

    error = _cpu_kernel._compile(_cpu_kernel._compiler(), tmp_path / "op.so", "hf_rmsnorm_cuda_warnings", False,
                                 extra=("-Wall", "-Wextra", "-Werror"), c_source=None, op_source=_cuda_launch._OP_SOURCE)
    assert error is None, error


@pytest.mark.parametrize("asked", [True, False], ids=["asked for", "default"])
def test_an_operator_that_cannot_be_built_is_said_once_and_the_python_path_serves(asked, monkeypatch, caplog):
    """Said once: a warning where HF_RMSNORM_CPP_LAUNCH=1 asked for the operator, an INFO line
    where it is only the default (the Python path serves the same results)."""
    pytest.importorskip("triton")
    from hf_rmsnorm.ops import _cuda_launch, _direct

    if not _direct._DIRECT_TRITON:
        pytest.skip("the operator is not built for this Triton release at all (its reason says so)")
    if asked:
        monkeypatch.setenv(_cuda_launch.CPP_LAUNCH_ENV, "1")
    else:
        monkeypatch.delenv(_cuda_launch.CPP_LAUNCH_ENV, raising=False)
    monkeypatch.setattr(_cuda_launch, "_ops", _cuda_launch._UNBUILT)
    monkeypatch.setattr(_cuda_launch, "_norm_op", None)
    monkeypatch.setattr(_cuda_launch, "_reason", _cuda_launch._reason)  # restored afterwards
    monkeypatch.setattr(_cuda_launch, "ENABLED", True)
    monkeypatch.setattr(_cpu_kernel, "build_library", lambda *a, **k: (None, "", "no C++ compiler found (test)"))
    with caplog.at_level("INFO", logger=_cuda_launch.__name__):
        assert _cuda_launch.ops() is None and _cuda_launch.ops() is None
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == _cuda_launch.__name__]
    who = "HF_RMSNORM_CPP_LAUNCH=1" if asked else "The C++ launch operator is the default on CUDA"
    assert said == [("WARNING" if asked else "INFO",
                     f"{who}, but the C++ launch operator cannot serve: no C++ compiler found (test); "
                     "the norms launch from Python")]
    assert _cuda_launch.unavailable_reason() == "no C++ compiler found (test)"
    assert _cuda_launch.forward(None, None, None, None, 1e-5, 0.0, True, 0) == (None, None)


def test_an_operator_library_without_its_operators_is_a_reason_not_an_error(monkeypatch, library_without_operators):
    """A library that loads but registers nothing where Python looks (torch 2.6-2.10 before the
    namespace macro was expanded, _op_shared.h) failed registering the operator's Python half
    (RuntimeError out of the first norm call on CUDA); now the Python path serves, with why."""
    pytest.importorskip("triton")
    from hf_rmsnorm.ops import _cuda_launch, _direct

    if not _direct._DIRECT_TRITON:
        pytest.skip("the operator is not built for this Triton release at all (its reason says so)")
    for name, value in (("_ops", _cuda_launch._UNBUILT), ("_reason", None), ("_norm_op", None), ("_path", None)):
        monkeypatch.setattr(_cuda_launch, name, value)
    monkeypatch.setattr(_cpu_kernel, "build_library", lambda *a, **k: (*library_without_operators, None))
    assert _cuda_launch.ops() is None and _cuda_launch.built_path() is None
    path, namespace = library_without_operators
    assert f"the CUDA launch operator {path} loaded" in _cuda_launch.unavailable_reason()
    assert f"registered no operator {namespace}::norm" in _cuda_launch.unavailable_reason()


def test_the_cli_builds_the_operator_ahead_of_time_or_says_why_not(monkeypatch, capsys):
    """``hf-rmsnorm build-cuda-launch``: the operator built before the first CUDA call (a
    container image, a machine about to go offline; no GPU needed); where it cannot be built,
    why, and a non-zero exit."""
    pytest.importorskip("triton")
    from hf_rmsnorm.cli import main
    from hf_rmsnorm.ops import _cuda_launch, _direct

    if not _direct._DIRECT_TRITON:
        pytest.skip("the operator is not built for this Triton release at all (its reason says so)")
    if _cpu_kernel._compiler() is not None:
        assert main(["build-cuda-launch"]) == 0
        path = _cuda_launch.built_path()
        assert path is not None and path.exists() and str(path) in capsys.readouterr().out
    for name, value in (("_ops", _cuda_launch._UNBUILT), ("_reason", None), ("_norm_op", None), ("_path", None)):
        monkeypatch.setattr(_cuda_launch, name, value)
    monkeypatch.setattr(_cpu_kernel, "build_library", lambda *a, **k: (None, "", "no C++ compiler found (test)"))
    assert main(["build-cuda-launch"]) == 1
    err = capsys.readouterr().err
    assert "no C++ compiler found (test); the norms on CUDA will launch from Python" in err
    assert _cuda_launch.built_path() is None
