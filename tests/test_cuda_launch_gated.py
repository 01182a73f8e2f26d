"""The C++ launch operator's gated norm (``_cuda_launch.gated_forward``): as ``test_cuda_launch.py``
checks the plain norms', it must launch the compiled gated kernels Triton's launcher would
launch, with the same grid, block, shared memory and parameters, its node must hand the backward
the forward's tensors, and the weight gradient must be the fold of the partial sums the kernel
wrote. In a child process with the kernels compiled for sm_90 and launches stubbed
(``launch_stub.py``); the stub writes float64 reference numbers where the kernels would."""

from __future__ import annotations

import textwrap

import pytest

from conftest import run_operator_child

_CHILD = textwrap.dedent('''
    with triton_without_gpu():
        from hf_rmsnorm.ops import _cuda_launch as C, _triton_gated as T
        from hf_rmsnorm.ops.gated_rms_norm import gated_rms_norm, gated_rms_norm_ref

        ops = install(C)
        # the kernels' leading arguments: (count, pointers) each
        N_ARGS = {{"_gated_fwd_kernel": (13, 5), "_gated_bwd_kernel": (17, 8)}}

        def case(m, n, size=None, dtype=torch.bfloat16, gate=True, weight=True, w_dtype=None, before=False,
                 activation="silu", cast_mode="input", offset=0.0, lead=(), start=0, gate_in=None):
            """x (lead..., m, n) starting ``start`` elements into its buffer; the gate a slice of
            rows ``gate_in`` wide where that is given (Mamba2's, split off a projection)."""
            x = torch.randn(start + m * n * (lead[0] if lead else 1), dtype=dtype)[start:].view(*lead, m, n)
            z = None
            if gate:
                z = torch.randn(*lead, m, gate_in or n, dtype=dtype)[..., :n]
            w = torch.randn(n, dtype=w_dtype or dtype) if weight else None
            settings = dict(group_size=size, norm_before_gate=before, activation=activation, cast_mode=cast_mode,
                            offset=offset)
            return [t.requires_grad_(True) if t is not None else None for t in (x, z, w)], settings

        cases = [
            case(64, 128, before=True),  # Qwen3-Next's order, one group
            case(16, 256, size=64, dtype=torch.float32, gate_in=512),  # Mamba2's: groups, a strided gate
            case(16, 256, size=64, w_dtype=torch.float32, lead=(2,)),  # an fp32 weight, rows of rank 3
            case(16, 96, size=48, gate=False),  # a grouped RMSNorm; 16 divides neither N nor S
            case(16, 128, weight=False, activation="sigmoid", before=True),
            case(1, 128, before=True, start=1),  # one row; x one element into its buffer
            case(40, 128, cast_mode="float32", offset=1.0),  # more tiles than programs a group (CPU: 8)
        ]

        def run(x, z, w, settings, dy):
            inputs = [t for t in (x, z, w) if t is not None]
            y = gated_rms_norm(x, z, w, **settings)
            return y, torch.autograd.grad(y, inputs, dy)

        def python_launches(x, z, w, settings, dy):
            """Triton's launcher calls of a forward and backward on the Python path (its second
            call, launched directly); sets the stub's parameter kinds for each kernel."""
            C.cpu_stub = False
            run(x, z, w, settings, dy)
            _NoLaunch.calls = []
            run(x, z, w, settings, dy)
            calls, _NoLaunch.calls = _NoLaunch.calls, None
            C.cpu_stub = True
            return decode_launches(calls, N_ARGS)

        def reference(x, z, w, settings, dy):
            """The float64 reference's y, rstd per group row, and gradients, in the dtypes the
            kernels write them."""
            wide = [t.detach().double().requires_grad_(True) if t is not None else None for t in (x, z, w)]
            with torch.enable_grad():
                y = gated_rms_norm_ref(*wide, eps=1e-6, **settings)
                grads = torch.autograd.grad(y, [t for t in wide if t is not None], dy.double())
            size = settings["group_size"] or x.shape[-1]
            h = wide[0].detach()
            if z is not None and not settings["norm_before_gate"]:
                act = torch.sigmoid if settings["activation"] == "sigmoid" else torch.nn.functional.silu
                h = h * act(wide[1].detach())
            rstd = torch.rsqrt(h.unflatten(-1, (-1, size)).pow(2).mean(-1) + 1e-6).reshape(-1).float()
            grads = iter(grads)
            dx, dz, dw = (next(grads).to(t.dtype) if t is not None else None for t in (x, z, w))
            return y.detach(), rstd, dx, dz, dw

        checked = 0
        for (x, z, w), settings in cases:
            dy = None
            y_probe = gated_rms_norm(x.detach(), None if z is None else z.detach(), None if w is None else w.detach(),
                                     **settings)
            dy = torch.randn_like(y_probe)
            python = python_launches(x, z, w, settings, dy)
            assert [l["name"] for l in python] == ["_gated_fwd_kernel", "_gated_bwd_kernel"], python
            fwd_fn, bwd_fn = python[0]["function"], python[1]["function"]
            y_ref, rstd_ref, dx_ref, dz_ref, dw_ref = reference(x, z, w, settings, dy)
            y_ref = y_ref.to(y_probe.dtype)
            size = settings["group_size"] or x.shape[-1]
            groups = x.shape[-1] // size

            def write(function, values):
                """What the kernels would write: y and rstd forward; dx, dgate and each group's
                weight gradient backward, in the first row of its first program's partial sums."""
                if function == fwd_fn:
                    for address, t in ((values[3], y_ref), (values[4], rstd_ref)):
                        ctypes.memmove(address, t.data_ptr(), t.numel() * t.element_size())
                    return
                ptrs = dict(zip([i for i in range(8)], values[:8]))
                ctypes.memmove(ptrs[5], dx_ref.data_ptr(), dx_ref.numel() * dx_ref.element_size())
                if dz_ref is not None:
                    ctypes.memmove(ptrs[6], dz_ref.data_ptr(), dz_ref.numel() * dz_ref.element_size())
                if dw_ref is not None:
                    programs = stub["calls"][-1]["grid"][0]
                    part = torch.zeros(programs, block_r * block_s)
                    part.view(programs // groups, groups, -1)[0, :, :size] = dw_ref.float().view(groups, size)
                    ctypes.memmove(ptrs[7], part.data_ptr(), part.numel() * 4)

            block_r, block_s = T.layout(size, T._BWD_TILE)  # a backward program's row of partial sums
            for attempt in range(3):  # the forward's plan, then the backward's, then both launched here
                stub["calls"], stub["write"] = [], write
                counts = C.launch_counts(gated=True)
                y, grads = run(x, z, w, settings, dy)
                stub["write"] = None
                if C.launch_counts(gated=True)[1] > counts[1]:
                    break
            assert C.launch_counts(gated=True) == [counts[0] + 1, counts[1] + 1], (attempt, settings)
            assert [c["function"] for c in stub["calls"]] == [fwd_fn, bwd_fn]
            assert y.grad_fn.name() == "HFGatedNormBackward"
            for ours, theirs in zip(stub["calls"], python):
                # the inputs the call was given are the same memory in both; fresh outputs alike in alignment
                same = (0, 1, 2) if theirs["name"] == "_gated_fwd_kernel" else (0, 1, 2, 3)
                assert_launched_as(ours, theirs, same, settings)
            fwd_values, bwd_values = (c["values"] for c in stub["calls"])
            assert fwd_values[4] == bwd_values[4], "the backward reads the forward's rstd"
            assert torch.equal(y, y_ref), (y.float() - y_ref.float()).abs().max()
            wanted = [r for r in (dx_ref, dz_ref, dw_ref) if r is not None]
            assert grads[0].data_ptr() == bwd_values[5]
            for g, r in zip(grads, wanted):
                assert g.dtype == r.dtype and g.shape == r.shape and torch.equal(g, r), (settings, (g - r).abs().max())
            checked += 1
        print("gated operator launches checked:", checked)

        # The ways around it. Without gradients: the operator's launch, no node.
        (x, z, w), settings = case(8, 128, dtype=torch.float32, before=True)
        python_launches(x, z, w, settings, torch.randn(8, 128))
        run(x, z, w, settings, torch.randn(8, 128))  # plans learnt
        with torch.no_grad():
            counts, counted = C.launch_counts(gated=True), T.LAUNCHES["gated_fwd"]
            assert gated_rms_norm(x, z, w, **settings).grad_fn is None
            assert C.launch_counts(gated=True)[0] == counts[0] + 1 and T.LAUNCHES["gated_fwd"] == counted + 1
        # a gate no view lays out in rows (the launchers copy it), a strided weight, a tensor
        # subclass, the torch backend: the Python path, never the operator
        class Seen(torch.Tensor):
            @classmethod
            def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
                plain = lambda t: t.as_subclass(torch.Tensor) if isinstance(t, Seen) else t
                return func(*[plain(a) for a in args], **{{k: plain(v) for k, v in (kwargs or {{}}).items()}})

        family = C.gated_forward(x, z, w, 1e-6, 0.0, 128, True, False, True)[1]
        counts = C.launch_counts(gated=True)
        assert C._gated_op(x, torch.randn(128, 8).t(), w, 1e-6, 0.0, family) is None
        assert C._gated_op(x, z, torch.randn(256)[::2], 1e-6, 0.0, family) is None
        assert C._gated_op(torch.Tensor._make_subclass(Seen, x.detach()), z, w, 1e-6, 0.0, family) is None
        assert C._gated_op(x.double(), z, w, 1e-6, 0.0, family) is None  # not the family's dtype
        assert C._gated_op(x, None, w, 1e-6, 0.0, family) is None  # the family has a gate
        os.environ["HF_RMSNORM_BACKEND"] = "torch"
        assert C._gated_op(x, z, w, 1e-6, 0.0, family) is None
        os.environ["HF_RMSNORM_BACKEND"] = "triton"
        assert C.launch_counts(gated=True) == counts
        assert C._gated_op(x, z, w, 1e-6, 0.0, family) is not None
        print("gated operator bypasses checked")

        # create_graph=True: the node's gradients as a graph of the torch composition, whose
        # second derivative is the float64 reference's
        (x, z, w), settings = case(8, 128, dtype=torch.float32, before=True)
        dy = torch.randn(8, 128, dtype=torch.float32)
        python_launches(x, z, w, settings, dy)
        y_ref = reference(x, z, w, settings, dy)[0].float()
        for _ in range(2):  # the second call is the operator's
            counts = C.launch_counts(gated=True)
            stub["write"] = lambda function, values: ctypes.memmove(values[3], y_ref.data_ptr(), y_ref.numel() * 4)
            y = gated_rms_norm(x, z, w, **settings)
            stub["write"] = None
        assert C.launch_counts(gated=True)[0] == counts[0] + 1 and y.grad_fn.name() == "HFGatedNormBackward"
        (gx,) = torch.autograd.grad(y, (x,), dy, create_graph=True)
        v = torch.randn_like(gx)
        (gw,) = torch.autograd.grad((gx * v).sum(), (w,))
        wide = [t.detach().double().requires_grad_(True) for t in (x, z, w)]
        (gxd,) = torch.autograd.grad(gated_rms_norm_ref(*wide, eps=1e-6, **settings), (wide[0],), dy.double(),
                                     create_graph=True)
        (gwd,) = torch.autograd.grad((gxd * v.double()).sum(), (wide[2],))
        torch.testing.assert_close(gw.double(), gwd, rtol=1e-4, atol=1e-4 * gwd.abs().max().item())
        # saved-tensor hooks see what the node saves: x, gate, weight, rstd
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            gated_rms_norm(x, z, w, **settings)
        assert [t.data_ptr() for t in packed[:3]] == [t.data_ptr() for t in (x, z, w)] and len(packed) == 4
        print("gated operator second derivatives checked")

        # A module's calls once one has gone to the operator: straight there with the family that
        # call settled (_module_calls.gated_settled), the general way (dispatch) not asked, with
        # the reference's numbers; whatever changed since sends a call the general way.
        import copy
        from hf_rmsnorm import FusedGatedRMSNorm, modules

        general = []
        real_dispatch = modules.dispatch

        def counted(*args, **kwargs):
            general.append(1)
            return real_dispatch(*args, **kwargs)

        def through(module, x, z):
            """(y, calls the general way took, the operator's gated forwards) for one call"""
            calls, launches = len(general), C.launch_counts(gated=True)[0]
            y = module(x, z)
            return y, len(general) - calls, C.launch_counts(gated=True)[0] - launches

        modules.dispatch = counted
        torch.manual_seed(2)
        m = FusedGatedRMSNorm(256, eps=1e-5, group_size=64)
        with torch.no_grad():
            m.weight.normal_()
        x, z = torch.randn(16, 256, requires_grad=True), torch.randn(16, 256, requires_grad=True)
        settings = dict(eps=1e-5, group_size=64, norm_before_gate=False, activation="silu", cast_mode="input")
        python_launches(x, z, m.weight, settings, torch.randn(16, 256))  # the plans, from the functional calls
        run(x, z, m.weight, settings, torch.randn(16, 256))
        assert m._settled is None
        _, taken, _ = through(m, x, z)
        assert taken == 1 and m._settled is not None
        y_ref = gated_rms_norm_ref(x.detach().double(), z.detach().double(), m.weight.detach().double(), eps=1e-5,
                                   group_size=64).float()
        stub["write"] = lambda function, values: ctypes.memmove(values[3], y_ref.data_ptr(), y_ref.numel() * 4)
        y, taken, launched = through(m, x, z)
        stub["write"] = None
        assert (taken, launched) == (0, 1) and torch.equal(y, y_ref) and y.grad_fn.name() == "HFGatedNormBackward"
        with torch.no_grad():
            y, taken, launched = through(m, x, z)
        assert (taken, launched) == (0, 1) and y.grad_fn is None

        def general_way(module, x, z):
            y, taken, launched = through(module, x, z)
            assert taken == 1, "the settled call took it"
            return y, launched

        general_way(m, torch.randn(256, 16).t(), z)  # x no view lays out in rows
        python_launches(x, None, m.weight, settings, torch.randn(16, 256))  # the stub's view of its kernels
        general_way(m, x, None)  # no gate: another family
        assert through(m, x, None)[1:] == (0, 1)  # which is now the settled one
        general_way(m, x, z)
        C.ENABLED = False
        assert general_way(m, x, z)[1] == 0 and m._settled is None  # off: settles nothing
        C.ENABLED = True
        general_way(m, x, z)
        os.environ["HF_RMSNORM_BACKEND"] = "torch"
        assert through(m, x, z)[2] == 0  # the operator asks the backend: the torch path serves, settled as it was
        os.environ["HF_RMSNORM_BACKEND"] = "triton"
        assert through(m, x, z)[1:] == (0, 1)
        m.norm_before_gate = True  # a setting changed: another family, found the general way
        python_launches(x, z, m.weight, dict(settings, norm_before_gate=True), torch.randn(16, 256))
        general_way(m, x, z)
        assert m._settled[2][1] is True and through(m, x, z)[1:] == (0, 1)
        m.norm_before_gate = False
        general_way(m, x, z)
        twin = copy.deepcopy(m)  # a copy holds a copy of this process's token: it settles afresh
        general_way(twin, x, z)
        assert through(twin, x, z)[1:] == (0, 1)
        launches = C.launch_counts(gated=True)[0]
        torch.compile(m, backend="eager", fullgraph=True)(x, z)  # through the custom op, not the operator
        assert C.launch_counts(gated=True)[0] == launches
        modules.dispatch = real_dispatch
        print("gated operator settled module calls checked")
''')


@pytest.mark.slow
def test_the_gated_operator_launches_as_triton_would_and_its_node_passes_the_forwards_tensors(tmp_path):
    stdout = run_operator_child(tmp_path, _CHILD)
    assert "gated operator launches checked: 7" in stdout, stdout
    assert "gated operator bypasses checked" in stdout, stdout
    assert "gated operator second derivatives checked" in stdout, stdout
    assert "gated operator settled module calls checked" in stdout, stdout
