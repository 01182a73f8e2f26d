// The compiled CPU RMSNorm (_cpu_rms_norm.c) as a torch operator, its autograd written in C++.
//
// Why an operator and not the C functions called from Python: at a few tokens a call the
// arithmetic takes a few microseconds, and a Python-defined op costs more than that around it.
// On the CI CPU an empty torch.autograd.Function takes about 40 us forward+backward, as long as
// nn.LayerNorm's whole forward+backward at one token, and a ctypes call about 2.7 us. Here a
// call is one dispatcher call and the backward node runs without Python, as torch's own ops do.
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
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <atomic>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

extern "C" {
int rms_norm_forward(const void *x, const void *w, const void *b, void *y, float *rstd, int64_t m, int64_t n,
                     double eps, float offset, int flags);
int rms_norm_backward(const void *dy, const void *x, const float *rstd, const void *w, void *dx, void *dw, void *db,
                      int64_t m, int64_t n, float offset, int flags);
}

#define HF_STR2(s) #s
#define HF_STR(s) HF_STR2(s)

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

// the C functions' flag bits (FLAG_* in _cpu_rms_norm.c); the thread count goes above them
constexpr int64_t kYBf16 = 8, kThreadsShift = 8;
// Below this many elements one thread does the call: waking a second costs more than it saves
// (the grain torch's own CPU kernels use).
constexpr int64_t kParallelMin = 32768;

// false where the process has a second OpenMP runtime beside torch's (set by the loader): then
// every call runs on one thread rather than keep two thread pools spinning
std::atomic<bool> parallel_allowed{true};
// calls of the C functions, forward and backward: what the tests read to know the kernel ran
std::atomic<int64_t> forward_calls{0}, backward_calls{0};

int with_threads(int64_t flags, int64_t numel) {
    const int64_t threads = parallel_allowed && numel >= kParallelMin ? at::get_num_threads() : 1;
    return static_cast<int>(flags | (threads << kThreadsShift));
}

const void *data(const OptTensor &t) { return t.has_value() && t->defined() ? t->data_ptr() : nullptr; }

int64_t rows_of(const at::Tensor &x) { return x.numel() / x.size(-1); }

// (y, rstd): rstd, float32 one per row, only with_rstd
std::pair<at::Tensor, at::Tensor> forward_rows(const at::Tensor &x_in, const OptTensor &w, const OptTensor &b,
                                               double eps, double offset, int64_t flags, at::ScalarType out_dtype,
                                               bool with_rstd) {
    const at::Tensor x = x_in.contiguous();  // the kernel reads rows in place
    const int64_t n = x.size(-1), m = rows_of(x);
    at::Tensor y = at::empty(x.sizes(), x.options().dtype(out_dtype));
    at::Tensor rstd = with_rstd ? at::empty({m}, x.options().dtype(at::kFloat)) : at::Tensor();
    const int status = rms_norm_forward(x.data_ptr(), data(w), data(b), y.data_ptr(),
                                        with_rstd ? rstd.data_ptr<float>() : nullptr, m, n, eps,
                                        static_cast<float>(offset), with_threads(flags, x.numel()));
    TORCH_CHECK_WITH(OutOfMemoryError, status == 0, "rms_norm on the CPU: no memory for a few rows of ", n, " floats");
    ++forward_calls;
    return {y, rstd};
}

// the gradients of a hand-written backward as a graph, for create_graph=True: the operator that
// rms_norm.py registers under this name differentiates its torch reference
const c10::TypedOperatorHandle<std::vector<at::Tensor>(const at::Tensor &, const at::Tensor &, const OptTensor &,
                                                       const OptTensor &, double, double, std::string_view, int64_t)> &
graph_backward() {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow(HF_STR(HF_RMSNORM_NS) "::rms_norm_graph_backward", "")
                               .typed<std::vector<at::Tensor>(const at::Tensor &, const at::Tensor &, const OptTensor &,
                                                              const OptTensor &, double, double, std::string_view,
                                                              int64_t)>();
    return op;
}

OptTensor maybe(const at::Tensor &t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// With n = x * rstd and g = dy * (offset + w): dx = rstd * (g - n * mean(g * n)),
// dw = sum over rows of dy * round?(n), db = sum over rows of dy (the C file has the details).
struct RMSNormFunction : public torch::autograd::Function<RMSNormFunction> {
    static at::Tensor forward(AutogradContext *ctx, const at::Tensor &x, const OptTensor &w, const OptTensor &b,
                              double eps, double offset, int64_t flags, at::ScalarType out_dtype,
                              std::string_view cast_mode) {
        auto [y, rstd] = forward_rows(x, w, b, eps, offset, flags, out_dtype, /*with_rstd=*/true);
        // x itself, not its contiguous copy: a second derivative differentiates with respect to it
        ctx->save_for_backward({x, w.value_or(at::Tensor()), b.value_or(at::Tensor()), rstd});
        ctx->saved_data["eps"] = eps;
        ctx->saved_data["offset"] = offset;
        ctx->saved_data["flags"] = flags;
        ctx->saved_data["cast_mode"] = std::string(cast_mode);
        return y;
    }

    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        const auto saved = ctx->get_saved_variables();
        const at::Tensor &x = saved[0], &w = saved[1], &b = saved[2], &rstd = saved[3];
        // needs_input_grad counts the inputs that were tensors: an absent weight or bias has none
        size_t edge = 0;
        const bool need_x = ctx->needs_input_grad(edge++);
        const bool need_w = w.defined() && ctx->needs_input_grad(edge++);
        const bool need_b = b.defined() && ctx->needs_input_grad(edge++);
        const double offset = ctx->saved_data["offset"].toDouble();
        at::Tensor dx, dw, db;
        if (at::GradMode::is_enabled()) {  // create_graph=True: the closed form is not differentiable
            const auto got = graph_backward().call(grads[0], x, maybe(w), maybe(b),
                                                   ctx->saved_data["eps"].toDouble(), offset,
                                                   ctx->saved_data["cast_mode"].toStringRef(),
                                                   need_x | (need_w << 1) | (need_b << 2));
            size_t i = 0;  // the wanted gradients, in order
            for (auto [need, out] : {std::pair{need_x, &dx}, {need_w, &dw}, {need_b, &db}})
                if (need) *out = got.at(i++);
        } else {
            at::Tensor dy = grads[0].contiguous();  // autograd may hand over an expanded gradient
            if (dy.scalar_type() != at::kFloat && dy.scalar_type() != at::kBFloat16) dy = dy.to(at::kFloat);
            const at::Tensor xc = x.contiguous();
            int64_t flags = ctx->saved_data["flags"].toInt() & ~kYBf16;
            if (dy.scalar_type() == at::kBFloat16) flags |= kYBf16;
            // the parameter gradients are summed and rounded to the parameters' dtypes in the call
            if (need_x) dx = at::empty(xc.sizes(), xc.options());
            if (need_w) dw = at::empty(w.sizes(), w.options());
            if (need_b) db = at::empty(b.sizes(), b.options());
            const auto ptr = [](const at::Tensor &t) { return t.defined() ? t.data_ptr() : nullptr; };
            const int64_t n = xc.size(-1);
            const int status = rms_norm_backward(dy.data_ptr(), xc.data_ptr(), rstd.data_ptr<float>(), ptr(w),
                                                 ptr(dx), ptr(dw), ptr(db), rows_of(xc), n,
                                                 static_cast<float>(offset), with_threads(flags, xc.numel()));
            TORCH_CHECK_WITH(OutOfMemoryError, status == 0, "rms_norm backward on the CPU: no memory for a few rows of ",
                             n, " floats");
            ++backward_calls;
        }
        return {dx, dw, db, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
};

at::Tensor rms_norm(const at::Tensor &x, const OptTensor &w, const OptTensor &b, double eps, double offset,
                    int64_t flags, at::ScalarType out_dtype, std::string_view cast_mode) {
    const auto wants_grad = [](const OptTensor &t) { return t.has_value() && t->requires_grad(); };
    if (at::GradMode::is_enabled() && (x.requires_grad() || wants_grad(w) || wants_grad(b)))
        return RMSNormFunction::apply(x, w, b, eps, offset, flags, out_dtype, cast_mode);
    // no graph to record: no node, no saved tensors, no statistics kept
    return forward_rows(x, w, b, eps, offset, flags, out_dtype, /*with_rstd=*/false).first;
}

std::vector<int64_t> calls() { return {forward_calls.load(), backward_calls.load()}; }

void set_parallel(bool allowed) { parallel_allowed = allowed; }

}  // namespace

TORCH_LIBRARY(HF_RMSNORM_NS, m) {
    m.def("rms_norm(Tensor x, Tensor? weight, Tensor? bias, float eps, float offset, int flags, "
          "ScalarType out_dtype, str cast_mode) -> Tensor");
    // implemented in Python (rms_norm.py) on torch ops, for second derivatives only
    m.def("rms_norm_graph_backward(Tensor grad, Tensor x, Tensor? weight, Tensor? bias, float eps, float offset, "
          "str cast_mode, int needs) -> Tensor[]");
    m.def("calls() -> int[]", &calls);
    m.def("set_parallel(bool allowed) -> ()", &set_parallel);
}

TORCH_LIBRARY_IMPL(HF_RMSNORM_NS, CompositeImplicitAutograd, m) { m.impl("rms_norm", &rms_norm); }
