// The compiled CPU RMSNorm (_cpu_rms_norm.c) as a torch operator, its autograd node in C++; and
// the gated RMSNorm's forward and backward as two plain operators (at the end).
//
// Why an operator and not the C functions called from Python: at a few tokens a call the
// arithmetic takes a few microseconds, and a Python-defined op costs more than that around it.
// On the CI CPU, one token of 768 fp32, forward+backward: the module through ctypes and a Python
// autograd.Function 114 us, through this operator 73 us, nn.LayerNorm 57 (benchmarks/NOTES.md,
// session 24). A call is one dispatcher call and the backward node runs without Python, as
// torch's own ops do.
//
// Built by _cpu_kernel.py on first use with torch's headers, the C file compiled as C and linked
// in. The namespace (HF_RMSNORM_NS) is given per build, so that two builds can be loaded in one
// process (the tests build several). Everything the caller checks stays in Python, decided once
// per signature (rms_norm.py, _compiled_kernel): CPU, plain tensors, float32/bfloat16, contiguous
// parameters of the row's length, at least one element. The dtypes and options arrive as the C
// functions' flags.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include "_op_shared.h"  // make_node, plain, backend_is_one_of

#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

extern "C" {
int rms_norm_forward(const void *x, const void *w, const void *b, void *y, float *rstd, int64_t m, int64_t n,
                     double eps, float offset, int flags);
int rms_norm_backward(const void *dy, const void *x, const float *rstd, const void *w, void *dx, void *dw, void *db,
                      int64_t m, int64_t n, float offset, int flags);
int gated_rms_norm_forward(const void *x, int64_t sx, const void *z, int64_t sz, const void *w, void *y, float *rstd,
                           int64_t m, int64_t n, int64_t s, double eps, float offset, int flags);
int gated_rms_norm_backward(const void *dy, int64_t sdy, const void *x, int64_t sx, const void *z, int64_t sz,
                            const void *w, const float *rstd, void *dx, void *dz, void *dw, int64_t m, int64_t n,
                            int64_t s, float offset, int flags);
}

namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

// the C functions' flag bits (FLAG_* in _cpu_rms_norm.c); the thread count goes above them
constexpr int64_t kXBf16 = 1, kWBf16 = 2, kBBf16 = 4, kYBf16 = 8, kThreadsShift = 8;
// the gated functions' gate dtype takes the bias's bit (the gated norm has no bias)
constexpr int64_t kZBf16 = kBBf16;
// Below this many elements one thread does the call: waking a second costs more than it saves
// (the grain torch's own CPU kernels use).
constexpr int64_t kParallelMin = 32768;

// false where the process has a second OpenMP runtime beside torch's (set by the loader): then
// every call runs on one thread rather than keep two thread pools spinning
std::atomic<bool> parallel_allowed{true};
// calls of the C functions, forward and backward, the plain norm's and the gated norm's: what the
// tests read to know the kernel ran
std::atomic<int64_t> forward_calls{0}, backward_calls{0}, gated_forward_calls{0}, gated_backward_calls{0};

int with_threads(int64_t flags, int64_t numel) {
    const int64_t threads = parallel_allowed && numel >= kParallelMin ? at::get_num_threads() : 1;
    return static_cast<int>(flags | (threads << kThreadsShift));
}

// a tensor's memory, or NULL for an absent one (what the C functions take for "no weight")
void *data(const at::Tensor &t) { return t.defined() ? t.data_ptr() : nullptr; }
void *data(const OptTensor &t) { return t.has_value() ? data(*t) : nullptr; }

int64_t rows_of(const at::Tensor &x) { return x.numel() / x.size(-1); }

// t's values as memory holds them: a negative view (the lazy negation bit; the imaginary part of
// a conjugated complex tensor is one) keeps them un-negated, so it is materialised first
at::Tensor values(const at::Tensor &t) { return t.defined() && t.is_neg() ? t.resolve_neg() : t; }
OptTensor values(const OptTensor &t) { return t.has_value() ? OptTensor(values(*t)) : std::nullopt; }

at::ScalarType flag_dtype(int64_t flags, int64_t bit) { return flags & bit ? at::kBFloat16 : at::kFloat; }

bool present(const OptTensor &t) { return t.has_value() && t->defined(); }

// A parameter the C functions read n values of: contiguous CPU memory of the flags' dtype.
void check_param(const OptTensor &p, int64_t bit, const char *name, int64_t n, int64_t flags, const char *op) {
    if (!present(p)) return;
    const at::Tensor &t = *p;
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == flag_dtype(flags, bit) && t.dim() == 1 && t.size(0) == n &&
                    t.is_contiguous(),
                "hf_rmsnorm's CPU ", op, ": ", name, " must be a contiguous CPU tensor of ", n, " ",
                flag_dtype(flags, bit), " values (as flags say), got ", t.scalar_type(), " on ", t.device(),
                " of shape ", t.sizes());
}

// Activations the C functions read: a non-empty CPU tensor of the flags' dtype.
void check_activations(const at::Tensor &t, int64_t bit, const char *name, int64_t flags, const char *op) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == flag_dtype(flags, bit) && t.dim() >= 1 && t.numel() > 0,
                "hf_rmsnorm's CPU ", op, ": ", name, " must be a non-empty CPU tensor of ", flag_dtype(flags, bit),
                " (as flags say), got ", t.scalar_type(), " on ", t.device(), " of shape ", t.sizes());
}

// rms_norm.py decides all of this once per signature before it calls; checked again here, a few
// comparisons a call, so that no call of the operator (it is visible in torch.ops) can make the
// C functions read memory the tensors do not have
void check_inputs(const at::Tensor &x, const OptTensor &w, const OptTensor &b, int64_t flags) {
    check_activations(x, kXBf16, "x", flags, "rms_norm");
    check_param(w, kWBf16, "weight", x.size(-1), flags, "rms_norm");
    check_param(b, kBBf16, "bias", x.size(-1), flags, "rms_norm");
}

// (y, rstd): rstd, float32 one per row, only with_rstd
std::pair<at::Tensor, at::Tensor> forward_rows(const at::Tensor &x_in, const OptTensor &w, const OptTensor &b,
                                               double eps, double offset, int64_t flags, at::ScalarType out_dtype,
                                               bool with_rstd) {
    const at::Tensor x = values(x_in).contiguous();  // the kernel reads rows in place
    const OptTensor wv = values(w), bv = values(b);
    const int64_t n = x.size(-1), m = rows_of(x);
    at::Tensor y = at::empty(x.sizes(), x.options().dtype(out_dtype));
    at::Tensor rstd = with_rstd ? at::empty({m}, x.options().dtype(at::kFloat)) : at::Tensor();
    const int status = rms_norm_forward(x.data_ptr(), data(wv), data(bv), y.data_ptr(),
                                        with_rstd ? rstd.data_ptr<float>() : nullptr, m, n, eps,
                                        static_cast<float>(offset), with_threads(flags, x.numel()));
    TORCH_CHECK_WITH(OutOfMemoryError, status == 0, "rms_norm on the CPU: no memory for a few rows of ", n, " floats");
    ++forward_calls;
    return {y, rstd};
}

// the gradients of a hand-written backward as a graph, for create_graph=True: the operator that
// rms_norm.py registers under this name differentiates its torch reference
using GraphBackward = std::vector<at::Tensor>(const at::Tensor &, const at::Tensor &, const OptTensor &,
                                              const OptTensor &, double, double, std::string_view, int64_t);
const c10::TypedOperatorHandle<GraphBackward> &graph_backward() {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow(HF_STR(HF_RMSNORM_NS) "::rms_norm_graph_backward", "")
                               .typed<GraphBackward>();
    return op;
}

OptTensor maybe(const at::Tensor &t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// The graph node, written as torch's generated ones are (NativeLayerNormBackward0 and the like)
// rather than with torch::autograd::Function, whose general bookkeeping (a map of saved values,
// the checks on every output) cost about 13 us a forward+backward more than nn.LayerNorm's node
// at one token on the CI CPU.
// With n = x * rstd and g = dy * (offset + w): dx = rstd * (g - n * mean(g * n)),
// dw = sum over rows of dy * round?(n), db = sum over rows of dy (the C file has the details).
struct RMSNormBackward : public torch::autograd::Node {
    SavedVariable x_, w_, b_, rstd_;
    double eps_ = 0, offset_ = 0;
    int64_t flags_ = 0;
    std::string cast_mode_;

    std::string name() const override { return "RMSNormBackward"; }

    void release_variables() override {
        std::lock_guard<std::mutex> lock(mutex_);
        x_.reset_data();
        w_.reset_data();
        b_.reset_data();
        rstd_.reset_data();
    }

    variable_list apply(variable_list &&grads) override {
        std::lock_guard<std::mutex> lock(mutex_);
        // x itself was saved, not its contiguous copy: a second derivative differentiates with
        // respect to it
        const at::Tensor x = x_.unpack(), w = w_.unpack(), b = b_.unpack(), rstd = rstd_.unpack();
        // the edges are x, weight, bias in that order; an absent parameter's edge is invalid
        const bool need_x = task_should_compute_output(0), need_w = task_should_compute_output(1),
                   need_b = task_should_compute_output(2);
        at::Tensor dx, dw, db;
        if (!grads[0].defined()) return {dx, dw, db};  // the output took no part in the loss
        if (at::GradMode::is_enabled()) {  // create_graph=True: the closed form is not differentiable
            const auto got = graph_backward().call(grads[0], x, maybe(w), maybe(b), eps_, offset_, cast_mode_,
                                                   need_x | (need_w << 1) | (need_b << 2));
            size_t i = 0;  // the wanted gradients, in order
            for (auto [need, out] : {std::pair{need_x, &dx}, {need_w, &dw}, {need_b, &db}})
                if (need) *out = got.at(i++);
            return {dx, dw, db};
        }
        at::Tensor dy = values(grads[0]).contiguous();  // autograd may hand over an expanded gradient
        if (dy.scalar_type() != at::kFloat && dy.scalar_type() != at::kBFloat16) dy = dy.to(at::kFloat);
        const at::Tensor xc = values(x).contiguous(), wv = values(w);
        const int64_t flags = (flags_ & ~kYBf16) | (dy.scalar_type() == at::kBFloat16 ? kYBf16 : 0);
        // the parameter gradients are summed and rounded to the parameters' dtypes in the call
        if (need_x) dx = at::empty(xc.sizes(), xc.options());
        if (need_w) dw = at::empty(w.sizes(), w.options());
        if (need_b) db = at::empty(b.sizes(), b.options());
        const int64_t n = xc.size(-1);
        const int status =
            rms_norm_backward(dy.data_ptr(), xc.data_ptr(), rstd.data_ptr<float>(), data(wv), data(dx), data(dw), data(db),
                              rows_of(xc), n, static_cast<float>(offset_), with_threads(flags, xc.numel()));
        TORCH_CHECK_WITH(OutOfMemoryError, status == 0, "rms_norm backward on the CPU: no memory for a few rows of ",
                         n, " floats");
        ++backward_calls;
        return {dx, dw, db};
    }
};

// y, and the autograd node where a gradient is wanted; the inputs checked by the caller
at::Tensor run(const at::Tensor &x, const OptTensor &w, const OptTensor &b, double eps, double offset, int64_t flags,
               std::string_view cast_mode) {
    const at::ScalarType out_dtype = flags & kYBf16 ? at::kBFloat16 : at::kFloat;
    if (!torch::autograd::compute_requires_grad(x, w, b))  // no graph to record: no node, no statistics
        return forward_rows(x, w, b, eps, offset, flags, out_dtype, /*with_rstd=*/false).first;
    auto [y, rstd] = forward_rows(x, w, b, eps, offset, flags, out_dtype, /*with_rstd=*/true);
    auto node = make_node<RMSNormBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(x, w, b));
    node->x_ = SavedVariable(x, false);
    node->w_ = SavedVariable(w, false);
    node->b_ = SavedVariable(b, false);
    node->rstd_ = SavedVariable(rstd, false);
    node->eps_ = eps;
    node->offset_ = offset;
    node->flags_ = flags;
    node->cast_mode_ = cast_mode;
    torch::autograd::set_history(y, node);
    return y;
}

at::Tensor rms_norm(const at::Tensor &x, const OptTensor &w, const OptTensor &b, double eps, double offset,
                    int64_t flags, std::string_view cast_mode) {
    check_inputs(x, w, b, flags);
    return run(x, w, b, eps, offset, flags, cast_mode);
}

// A FusedRMSNorm's settled call (rms_norm.py, settle_on_cpu): the kind of call its earlier call
// ran here, found in Python once (the dtypes' flags, the row's length, which parameters it has),
// so that its later calls ask everything in one C++ call. At one token a norm's arithmetic takes
// about 3 us on the CI CPU and each check in Python 0.1-0.2 us: asked there, they made the
// converted module 1.2x nn.LayerNorm (benchmarks/NOTES.md, session 31).
struct Settled {
    int64_t flags = 0, n = 0;
    bool has_w = false, has_b = false;
    std::string cast_mode;
};

std::shared_mutex settled_lock;  // registrations are rare (one per kind of call), lookups every call
std::vector<std::unique_ptr<const Settled>> settled_kinds;  // never removed: a pointer stays valid

int64_t settle(int64_t flags, std::string_view cast_mode, int64_t n, bool has_w, bool has_b) {
    TORCH_CHECK(n > 0 && flags >= 0 && flags < (int64_t{1} << kThreadsShift) && (has_w || !(flags & kWBf16)) &&
                    (has_b || !(flags & kBBf16)),
                "hf_rmsnorm's CPU rms_norm: no such call to settle (flags ", flags, ", n ", n, ")");
    std::unique_lock<std::shared_mutex> write(settled_lock);
    settled_kinds.push_back(std::make_unique<const Settled>(Settled{flags, n, has_w, has_b, std::string(cast_mode)}));
    return static_cast<int64_t>(settled_kinds.size()) - 1;
}

const Settled *settled_of(int64_t id) {
    std::shared_lock<std::shared_mutex> read(settled_lock);
    return id >= 0 && id < static_cast<int64_t>(settled_kinds.size()) ? settled_kinds[id].get() : nullptr;
}

// Where this thread's dispatcher state leaves the kernel's call to the general way: autocast on
// any device (its policy is the general way's: _norm.normalize), a Python dispatch mode or a
// functorch layer (their keys included). (A torch.func transform and torch.jit.trace are asked in
// Python, _module_calls.kernels_settled: vmap's fallback calls this operator per slice with those keys
// lifted, and the tracer clears its state before the call reaches this kernel.)
bool dispatch_state_is_default() {
    const auto tls = c10::impl::tls_local_dispatch_key_set();
    return (tls.included_ - c10::default_included_set).empty() &&
           tls.excluded_.isSupersetOf(c10::autocast_dispatch_keyset);
}

// forward-mode AD's tangent (level 0, the only one torch has): the kernel would drop it
bool has_tangent(const at::Tensor &t) { return t._fw_grad(/*level=*/0).defined(); }

// A tensor the settled kind reads: plain CPU memory of the flags' dtype (and, for a parameter,
// the row's length, contiguous), no tangent. Present exactly where the kind has it.
bool fits(const OptTensor &t, bool has, int64_t bf16_bit, const Settled &s) {
    const bool present = t.has_value() && t->defined();
    return present == has && (!present || (plain(*t) && t->device().is_cpu() && t->dim() == 1 && t->size(0) == s.n &&
                                           t->scalar_type() == (s.flags & bf16_bit ? at::kBFloat16 : at::kFloat) &&
                                           t->is_contiguous() && !has_tangent(*t)));
}

// y, or an undefined tensor (None in Python) where the call is not of the settled kind or this
// thread's state asks for the general way: the module then takes that way, which decides afresh
// (and settles again) or says what is wrong.
at::Tensor rms_norm_settled(const at::Tensor &x, const OptTensor &w, const OptTensor &b, double eps, double offset,
                            int64_t id) {
    const Settled *s = settled_of(id);
    if (s == nullptr || !plain(x) || !x.device().is_cpu() || x.dim() < 1 || x.size(-1) != s->n || x.numel() == 0 ||
        x.scalar_type() != (s->flags & kXBf16 ? at::kBFloat16 : at::kFloat) || has_tangent(x) ||
        !fits(w, s->has_w, kWBf16, *s) || !fits(b, s->has_b, kBBf16, *s) || !dispatch_state_is_default() ||
        !backend_is_one_of({"", "auto"}))
        return at::Tensor();
    return run(x, w, b, eps, offset, s->flags, s->cast_mode);
}

// ---------------------------------------------------------------------------------------------
// The gated RMSNorm's forward and backward (the C functions' second half), as plain operators:
// gated_rms_norm.py's autograd.Function calls them (the gated norm runs in Mamba2-style mixers, a
// few calls a layer, where a Python node's microseconds are small beside the mixer's own).
// ---------------------------------------------------------------------------------------------

// t as rows of n adjacent values, a view wherever one exists (a gate sliced off a projection is
// read in place), else a copy; and the elements from one row to the next
std::pair<at::Tensor, int64_t> as_rows(const at::Tensor &t, int64_t n) {
    at::Tensor rows = values(t).reshape({-1, n});
    if (n > 1 && rows.stride(1) != 1) rows = rows.contiguous();
    return {rows, rows.size(0) > 1 ? rows.stride(0) : n};
}

void check_gated(const at::Tensor &x, const OptTensor &z, const OptTensor &w, int64_t s, int64_t flags) {
    const char *op = "gated_rms_norm";
    check_activations(x, kXBf16, "x", flags, op);
    TORCH_CHECK(flags >= 0 && flags < (int64_t{1} << kThreadsShift) && s > 0 && x.size(-1) % s == 0,
                "hf_rmsnorm's CPU gated_rms_norm: no such call (flags ", flags, ", group size ", s, " of a row of ",
                x.size(-1), ")");
    if (present(z)) {
        check_activations(*z, kZBf16, "gate", flags, op);
        TORCH_CHECK(z->sizes() == x.sizes(), "hf_rmsnorm's CPU gated_rms_norm: the gate's shape ", z->sizes(),
                    " is not x's ", x.sizes());
    }
    check_param(w, kWBf16, "weight", x.size(-1), flags, op);
}

// (y, rstd): rstd, one float32 per row and group, only with_rstd (for a backward)
std::tuple<at::Tensor, at::Tensor> gated_rms_norm_fwd(const at::Tensor &x, const OptTensor &z, const OptTensor &w,
                                                      double eps, double offset, int64_t s, int64_t flags,
                                                      bool with_rstd) {
    check_gated(x, z, w, s, flags);
    const int64_t n = x.size(-1);
    const auto [xr, sx] = as_rows(x, n);
    const auto [zr, sz] = present(z) ? as_rows(*z, n) : std::pair{at::Tensor(), int64_t{0}};
    const OptTensor wv = values(w);
    const int64_t m = xr.size(0);
    at::Tensor y = at::empty(x.sizes(), x.options().dtype(flag_dtype(flags, kYBf16)));
    at::Tensor rstd = with_rstd ? at::empty({m * (n / s)}, x.options().dtype(at::kFloat)) : at::Tensor();
    const int status = gated_rms_norm_forward(xr.data_ptr(), sx, data(zr), sz, data(wv), y.data_ptr(),
                                              with_rstd ? rstd.data_ptr<float>() : nullptr, m, n, s, eps,
                                              static_cast<float>(offset), with_threads(flags, x.numel()));
    TORCH_CHECK_WITH(OutOfMemoryError, status == 0, "gated_rms_norm on the CPU: no memory for a few rows of ", n,
                     " floats");
    ++gated_forward_calls;
    return {y, rstd};
}

// (dx, dgate, dweight), each undefined (None) where not wanted; dy of y's dtype or any other
// (then read as float32)
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_rms_norm_bwd(const at::Tensor &dy_in, const at::Tensor &x,
                                                                  const OptTensor &z, const OptTensor &w,
                                                                  const at::Tensor &rstd, double offset, int64_t s,
                                                                  int64_t flags, bool need_x, bool need_z,
                                                                  bool need_w) {
    check_gated(x, z, w, s, flags);
    const int64_t n = x.size(-1);
    at::Tensor dy = dy_in;
    if (dy.scalar_type() != at::kFloat && dy.scalar_type() != at::kBFloat16) dy = dy.to(at::kFloat);
    TORCH_CHECK(dy.device().is_cpu() && dy.sizes() == x.sizes(), "hf_rmsnorm's CPU gated_rms_norm: the gradient's shape ",
                dy.sizes(), " on ", dy.device(), " is not x's, ", x.sizes(), " on the CPU");
    const auto [dyr, sdy] = as_rows(dy, n);
    const auto [xr, sx] = as_rows(x, n);
    const auto [zr, sz] = present(z) ? as_rows(*z, n) : std::pair{at::Tensor(), int64_t{0}};
    const int64_t m = xr.size(0);
    TORCH_CHECK(rstd.device().is_cpu() && rstd.scalar_type() == at::kFloat && rstd.is_contiguous() &&
                    rstd.numel() == m * (n / s),
                "hf_rmsnorm's CPU gated_rms_norm: rstd must be the forward's, ", m * (n / s),
                " contiguous float32 values on the CPU");
    const OptTensor wv = values(w);
    at::Tensor dw = need_w && present(w) ? at::empty(w->sizes(), w->options()) : at::Tensor();
    at::Tensor dx = need_x ? at::empty(x.sizes(), x.options()) : at::Tensor();
    at::Tensor dz = need_z && present(z) ? at::empty(z->sizes(), z->options()) : at::Tensor();
    const int64_t dy_flags = (flags & ~kYBf16) | (dy.scalar_type() == at::kBFloat16 ? kYBf16 : 0);
    const int status = gated_rms_norm_backward(dyr.data_ptr(), sdy, xr.data_ptr(), sx, data(zr), sz, data(wv),
                                               rstd.data_ptr<float>(), data(dx), data(dz), data(dw), m, n, s,
                                               static_cast<float>(offset), with_threads(dy_flags, x.numel()));
    TORCH_CHECK_WITH(OutOfMemoryError, status == 0, "gated_rms_norm backward on the CPU: no memory for a few rows of ",
                     n, " floats");
    ++gated_backward_calls;
    return {dx, dz, dw};
}

// forward and backward calls of the plain norm, then of the gated norm
std::vector<int64_t> calls() {
    return {forward_calls.load(), backward_calls.load(), gated_forward_calls.load(), gated_backward_calls.load()};
}

void set_parallel(bool allowed) { parallel_allowed = allowed; }

}  // namespace

HF_RMSNORM_LIBRARY(HF_RMSNORM_NS, m) {
    // the output is bfloat16 where flags say so (FLAG_Y_BF16), else float32
    m.def("rms_norm(Tensor x, Tensor? weight, Tensor? bias, float eps, float offset, int flags, str cast_mode) "
          "-> Tensor");
    // implemented in Python (rms_norm.py) on torch ops, for second derivatives only
    m.def("rms_norm_graph_backward(Tensor grad, Tensor x, Tensor? weight, Tensor? bias, float eps, float offset, "
          "str cast_mode, int needs) -> Tensor[]");
    // y, or None where the call is not of the kind settle() registered (or the thread's state asks
    // for the general way)
    m.def("rms_norm_settled(Tensor x, Tensor? weight, Tensor? bias, float eps, float offset, int kind) -> Tensor");
    m.def("settle(int flags, str cast_mode, int n, bool has_weight, bool has_bias) -> int", &settle);
    // the gated RMSNorm: y and rstd (None without with_rstd); the gradients wanted (None for others)
    m.def("gated_rms_norm_fwd(Tensor x, Tensor? gate, Tensor? weight, float eps, float offset, int group_size, "
          "int flags, bool with_rstd) -> (Tensor, Tensor)");
    m.def("gated_rms_norm_bwd(Tensor dy, Tensor x, Tensor? gate, Tensor? weight, Tensor rstd, float offset, "
          "int group_size, int flags, bool dx, bool dgate, bool dweight) -> (Tensor, Tensor, Tensor)");
    m.def("calls() -> int[]", &calls);
    m.def("set_parallel(bool allowed) -> ()", &set_parallel);
}

HF_RMSNORM_LIBRARY_IMPL(HF_RMSNORM_NS, CompositeImplicitAutograd, m) {
    m.impl("rms_norm", &rms_norm);
    m.impl("rms_norm_settled", &rms_norm_settled);
    m.impl("gated_rms_norm_fwd", &gated_rms_norm_fwd);
    m.impl("gated_rms_norm_bwd", &gated_rms_norm_bwd);
}
