// A norm on CUDA as one torch operator: it allocates the outputs, launches the Triton-compiled
// forward kernel with the CUDA driver's cuLaunchKernel and records a C++ autograd node, whose
// backward launches the backward kernel and the partial sums the same way, with no Python between
// a call and its launches. Two operators: ``norm`` (RMSNorm and LayerNorm, _triton_norm's kernels)
// and ``gated_norm`` (the gated RMSNorm, _triton_gated's, whose node folds the weight gradient's
// partial sums with the torch ops the Python path uses), on the machinery of _cuda_launch_core.h.
//
// Why: in a training forward the host time of each norm call is step time where the host paces
// the step (GPT-2-medium in bf16 on an H200, benchmarks/NOTES.md run 14b), and a Python
// autograd.Function around Triton's launch costs several times torch's own norm there (run 14c:
// 92-140 us a call against F.layer_norm's 23-31). torch's norms are one C++ operator that
// allocates, launches and records a C++ node; this is the same for the compiled Triton kernels.
//
// What stays in Python (_cuda_launch.py): which kernel, grid and arguments a call needs. The
// first call of each kind goes through the Python path, which compiles the kernels, and then
// registers a plan per launch here: the kernel's CUfunction, its launch shape and which of its
// arguments Triton kept (an integer equal to 1 and an absent tensor become constants and are not
// passed), under what Triton specialised the launch on (each pointer's presence and 16-byte
// alignment, each integer's being 1, its divisibility by 16 and its width) and, for the forward,
// the row-count threshold that picks the tiles. A forward whose facts have no plan returns an
// undefined tensor (None in Python): the Python path runs it and registers its plan; a backward
// without plans calls the Python backward this library registers, which does the same. The
// parameters are packed as Triton 3.6-3.9's launchers pack them (their driver.py): each kept
// argument, then the global and the profile scratch pointers, null here (a plan is registered only
// for kernels that need neither). For create_graph=True the node calls the torch reference's
// gradients as a graph (Python), the kernels having no second derivative. The gated norm's
// families and plans work alike; its key's extra fact is the kernels' DENSE (every row stride N).
//
// Built by _cpu_kernel.py's builder on first use with torch's headers and no CUDA headers: the
// driver's types are opaque pointers here, the stream comes from c10's device-generic interface.
#include "_cuda_launch_core.h"  // families, plans, keys, the launch

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <array>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#define HF_NS_STR HF_STR(HF_RMSNORM_NS)

namespace {

using torch::autograd::SavedVariable;

// Whether the call is as the family promises it; false where the Python path must take it. A
// module's settled call passes the family its earlier call found without asking again (the
// module's parameters can be replaced or converted, its input can be anything), and the operator
// is visible in torch.ops: no call may make a kernel read memory the tensors do not have, or
// compute what the family's kernels do not (a weightless call with an offset, or rounding to the
// weight's dtype, is the general path's to refuse).
bool fits(const Family &f, const at::Tensor &x, const OptTensor &w, const OptTensor &b, double eps, double offset) {
    return !f.gated && plain(x) && x.dim() >= 1 && x.size(-1) == f.n && x.scalar_type() == f.x && x.is_contiguous() &&
           x.numel() > 0 && (x.is_cuda() ? x.get_device() == f.device : stubbed.load()) &&
           param_fits(w, f.has_w, f.w, f, x) && param_fits(b, f.has_b, f.b, f, x) && eps >= 0 &&
           (f.has_w || (offset == 0 && f.rounding != kRoundToWeight)) && backend_is_one_of({"", "auto", "triton"});
}

// (row stride, M, N) as _triton_norm._row_layout reads a contiguous tensor of rows
std::array<int64_t, 3> layout(const at::Tensor &t) {
    const int64_t n = t.size(-1), m = t.numel() / n;
    return {t.dim() == 2 ? t.stride(0) : n, m, n};
}

// The backward's two launches, where plans for both are registered and dy is plain memory laid
// out as the forward's rows are: (dx, dweight, dbias), absent ones undefined; nullopt otherwise
// (the caller then takes the Python backward, which registers its launches' plans).
std::optional<std::array<at::Tensor, 3>> backward_launches(int64_t family, const Family &f, const at::Tensor &x,
                                                          const at::Tensor &w, const at::Tensor &mean,
                                                          const at::Tensor &rstd,
                                                          const at::Tensor &dy, double offset) {
    if (!dy.is_contiguous() || !plain(dy) || dy.scalar_type() != f.y || !dy.sizes().equals(x.sizes()) ||
        dy.device() != x.device())
        return std::nullopt;
    c10::OptionalDeviceGuard device_guard;
    if (x.is_cuda()) device_guard.reset_device(x.device());
    void *stream = nullptr;
    if (!stream_for(x, &stream)) return std::nullopt;
    const auto [stride_x, m, n] = layout(x);
    const int64_t stride_dy = layout(dy)[0], columns = (f.has_w + f.has_b) * n;
    at::Tensor dx = at::empty(x.sizes(), x.options());
    // the partials are allocated once the plan says how many programs write them: its key takes
    // them as a fresh allocation is, present and aligned
    uintptr_t ptrs[kMaxPtrs] = {ptr(x), ptr(w), ptr(dy), ptr(dx), columns ? uintptr_t(256) : 0, ptr(mean), ptr(rstd)};
    const int64_t ints[kMaxInts] = {stride_x, stride_dy, m, n};
    const auto bwd = find_plan(call_key(family, kBackward, ptrs, ints, false));
    if (!bwd) return std::nullopt;
    const int64_t programs = programs_for(*bwd, m);
    at::Tensor part, sums[2];
    std::optional<Plan> sum;
    uintptr_t sum_ptrs[kMaxPtrs] = {};
    int64_t sum_ints[kMaxInts] = {};
    if (columns) {
        part = at::empty({programs, columns}, x.options().dtype(at::kFloat));
        ptrs[4] = ptr(part);
        if (ptrs[4] % 16 != 0) return std::nullopt;
        int k = 0;
        if (f.has_w) sums[k++] = at::empty({n}, x.options().dtype(f.w));
        if (f.has_b) sums[k++] = at::empty({n}, x.options().dtype(f.b));
        sum_ptrs[0] = ptrs[4];
        sum_ptrs[1] = ptr(sums[0]);
        sum_ptrs[2] = ptr(sums[1]);
        sum_ints[0] = programs;
        sum_ints[1] = columns;
        sum_ints[2] = n;
        sum = find_plan(call_key(family, kSums, sum_ptrs, sum_ints, false));
        if (!sum) return std::nullopt;
    }
    const double floats[1] = {offset};
    launch(*bwd, kBackward, ptrs, ints, floats, programs, stream);
    if (columns) launch(*sum, kSums, sum_ptrs, sum_ints, nullptr, programs_for(*sum, columns), stream);
    std::array<at::Tensor, 3> grads = {dx, at::Tensor(), at::Tensor()};
    int k = 0;
    if (f.has_w) grads[1] = sums[k++];
    if (f.has_b) grads[2] = sums[k++];
    return grads;
}

// the backward in Python (_norm._bwd_impl, registering its launches' plans) and, for
// create_graph=True, the torch reference's gradients as a graph (_cuda_launch.py); each returns
// the wanted gradients in order
using Backward = std::vector<at::Tensor>(const at::Tensor &, const at::Tensor &, const OptTensor &, const OptTensor &,
                                         const OptTensor &, const at::Tensor &, double, double, int64_t, int64_t);

// What both operators' nodes keep besides their tensors.
struct LaunchNode : public torch::autograd::Node {
    double eps_ = 0, offset_ = 0;
    int64_t family_ = 0;
};

// A new node of type N recorded as y's grad_fn, its edges to the inputs x, a, b (an absent one's
// edge invalid); the caller saves the tensors its backward reads.
template <class N, class A, class B>
auto record_node(at::Tensor &y, const at::Tensor &x, const A &a, const B &b, double eps, double offset,
                 int64_t family) {
    auto node = make_node<N>();
    node->set_next_edges(torch::autograd::collect_next_edges(x, a, b));
    node->eps_ = eps;
    node->offset_ = offset;
    node->family_ = family;
    torch::autograd::set_history(y, node);
    return node;
}

struct NormBackward : public LaunchNode {
    SavedVariable x_, w_, b_, mean_, rstd_;

    std::string name() const override { return "HFNormBackward"; }

    void release_variables() override {
        std::lock_guard<std::mutex> guard(mutex_);
        for (SavedVariable *v : {&x_, &w_, &b_, &mean_, &rstd_}) v->reset_data();
    }

    variable_list apply(variable_list &&grads) override {
        std::lock_guard<std::mutex> guard(mutex_);
        const at::Tensor x = x_.unpack(), w = w_.unpack(), b = b_.unpack(), mean = mean_.unpack(), rstd = rstd_.unpack();
        return node_gradients(
            *this, grads, [&] { return backward_launches(family_, family_of(family_), x, w, mean, rstd, grads[0], offset_); },
            [&](bool graph, int64_t needs) {
                // looked up once: the namespace is this build's
                static const auto python =
                    c10::Dispatcher::singleton().findSchemaOrThrow(HF_NS_STR "::backward", "").typed<Backward>();
                static const auto as_graph =
                    c10::Dispatcher::singleton().findSchemaOrThrow(HF_NS_STR "::graph_backward", "").typed<Backward>();
                return (graph ? as_graph : python)
                    .call(grads[0], x, maybe(w), maybe(b), maybe(mean), rstd, eps_, offset_, family_, needs);
            });
    }
};

// y, or an undefined tensor where no plan covers the call (the caller then takes the Python path)
at::Tensor norm(const at::Tensor &x, const OptTensor &w, const OptTensor &b, double eps, double offset, int64_t family) {
    const Family f = family_of(family);
    if (!fits(f, x, w, b, eps, offset)) return at::Tensor();
    c10::OptionalDeviceGuard device_guard;
    if (x.is_cuda()) device_guard.reset_device(x.device());  // a model spread over GPUs: x's device current
    const auto [stride, m, n] = layout(x);
    const auto stats = x.options().dtype(at::kFloat);
    at::Tensor y = at::empty(x.sizes(), x.options().dtype(f.y));
    at::Tensor mean = f.is_rms ? at::Tensor() : at::empty({m}, stats), rstd = at::empty({m}, stats);
    const uintptr_t ptrs[kMaxPtrs] = {ptr(x), ptr(y), ptr(w), ptr(b), ptr(mean), ptr(rstd)};
    const int64_t ints[kMaxInts] = {stride, m, n};
    const auto plan = find_plan(call_key(family, kForward, ptrs, ints, m >= f.threshold));
    void *stream = nullptr;
    if (!plan || !stream_for(x, &stream)) return at::Tensor();
    const double floats[2] = {eps, offset};
    launch(*plan, kForward, ptrs, ints, floats, programs_for(*plan, m), stream);
    if (!torch::autograd::compute_requires_grad(x, w, b)) return y;
    auto node = record_node<NormBackward>(y, x, w, b, eps, offset, family);
    node->x_ = SavedVariable(x, false);
    node->w_ = SavedVariable(w.has_value() ? *w : at::Tensor(), false);
    node->b_ = SavedVariable(b.has_value() ? *b : at::Tensor(), false);
    node->mean_ = SavedVariable(mean, false);
    node->rstd_ = SavedVariable(rstd, false);
    return y;
}

// ---- The gated norm (_triton_gated's kernels; gated_rms_norm.py has the maths) ----

// The row stride of t read as (M, N) rows of unit column stride, as gated_rms_norm._rows_of
// lays it out where that is a view of t (N where every leading size is 1); -1 where it is not a
// view (the Python path copies such a tensor): the leading dimensions must merge into one.
int64_t row_stride(const at::Tensor &t) {
    const int64_t n = t.size(-1);
    if (n > 1 && t.stride(-1) != 1) return -1;
    int64_t stride = n, next = -1;  // next: the stride the next outer dimension must have
    for (int64_t i = t.dim() - 2; i >= 0; --i) {
        if (t.size(i) == 1) continue;
        if (next >= 0 && t.stride(i) != next) return -1;
        if (next < 0) stride = t.stride(i);
        next = t.stride(i) * t.size(i);
    }
    return stride;
}

// The gated kernels' DENSE: every row stride is N (the leading integers are the row strides,
// then M and N), or there is at most one row; an absent gate's stride (0) does not count.
bool gated_dense(int64_t kernel, const Family &f, const int64_t *ints) {
    const int strides = kernel == kGatedForward ? 2 : 3;
    const int64_t m = ints[strides], n = ints[strides + 1];
    for (int i = 0; i < strides; ++i)
        if (ints[i] != n && !(i == strides - 1 && !f.has_z) && m > 1) return false;
    return true;
}

// A gated call as its family promises it (fits' rules, with the gate's): the row strides of x
// and the gate in ``strides``; false where the Python path must take the call.
bool gated_fits(const Family &f, const at::Tensor &x, const OptTensor &z, const OptTensor &w, double eps,
                double offset, int64_t *strides) {
    if (!f.gated || !plain(x) || x.dim() < 1 || x.size(-1) != f.n || x.scalar_type() != f.x || x.numel() == 0 ||
        (x.is_cuda() ? x.get_device() != f.device : !stubbed.load()) || !param_fits(w, f.has_w, f.w, f, x) ||
        eps < 0 || (!f.has_w && offset != 0) || !backend_is_one_of({"", "auto", "triton"}))
        return false;
    const bool has_z = z.has_value() && z->defined();
    if (has_z != f.has_z || (has_z && (!plain(*z) || z->scalar_type() != f.z || !z->sizes().equals(x.sizes()) ||
                                       z->device() != x.device())))
        return false;
    strides[0] = row_stride(x);
    strides[1] = has_z ? row_stride(*z) : 0;
    return strides[0] >= 0 && strides[1] >= 0;
}

// The gated backward's launch, where its plan is registered and dy is plain memory in rows of
// x's shape: (dx, dgate, dweight), absent ones undefined; nullopt otherwise (the caller then
// takes the Python backward, which registers the launch's plan). The weight gradient's
// partial sums are folded as the Python path folds them, with the same torch ops.
std::optional<std::array<at::Tensor, 3>> gated_backward_launches(int64_t family, const Family &f,
                                                                const at::Tensor &x, const at::Tensor &z,
                                                                const at::Tensor &w, const at::Tensor &rstd,
                                                                const at::Tensor &dy, double offset) {
    if (f.tile_rows == 0 || !plain(dy) || dy.scalar_type() != f.y || !dy.sizes().equals(x.sizes()) ||
        dy.device() != x.device())
        return std::nullopt;
    const int64_t n = f.n, m = x.numel() / n, groups = n / f.s, tiles = (m + f.tile_rows - 1) / f.tile_rows;
    const int64_t ints[kMaxInts] = {row_stride(dy), row_stride(x), f.has_z ? row_stride(z) : 0, m, n, f.s, groups,
                                    tiles};
    if (ints[0] < 0 || ints[1] < 0 || ints[2] < 0) return std::nullopt;
    c10::OptionalDeviceGuard device_guard;
    if (x.is_cuda()) device_guard.reset_device(x.device());
    void *stream = nullptr;
    if (!stream_for(x, &stream)) return std::nullopt;
    at::Tensor dx = at::empty(x.sizes(), x.options());
    at::Tensor dz = f.has_z ? at::empty(x.sizes(), z.options()) : at::Tensor();
    // the partials are allocated once the plan says how many programs write them: its key takes
    // them as a fresh allocation is, aligned
    uintptr_t ptrs[kMaxPtrs] = {ptr(dy), ptr(x),  ptr(f.has_z ? z : x),  ptr(f.has_w ? w : x),
                                ptr(rstd), ptr(dx), ptr(f.has_z ? dz : dx), f.has_w ? uintptr_t(256) : ptr(dx)};
    const auto plan = find_plan(call_key(family, kGatedBackward, ptrs, ints, gated_dense(kGatedBackward, f, ints)));
    if (!plan) return std::nullopt;
    // programs work on group p mod G: a multiple of G, at most one a tile (_triton_gated.gated_bwd)
    const int64_t programs = groups * programs_for(*plan, m);
    at::Tensor part;
    if (f.has_w) {
        part = at::empty({programs, plan->width}, x.options().dtype(at::kFloat));
        ptrs[7] = ptr(part);
        if (ptrs[7] % 16 != 0) return std::nullopt;
    }
    const double floats[1] = {offset};
    launch(*plan, kGatedBackward, ptrs, ints, floats, programs, stream);
    at::Tensor dw;
    if (f.has_w)  // program p summed group p mod G: fold the programs of each group and the tile's rows
        dw = part.view({programs / groups, groups, f.tile_rows, plan->width / f.tile_rows})
                 .slice(3, 0, f.s)
                 .sum(at::IntArrayRef{0, 2})
                 .reshape({n})
                 .to(f.w);
    return std::array<at::Tensor, 3>{dx, dz, dw};
}

// as Backward, for the gated norm: (grad, x, gate, weight, rstd, eps, offset, family, needs)
using GatedBackward = std::vector<at::Tensor>(const at::Tensor &, const at::Tensor &, const OptTensor &,
                                              const OptTensor &, const at::Tensor &, double, double, int64_t, int64_t);

struct GatedNormBackward : public LaunchNode {
    SavedVariable x_, z_, w_, rstd_;

    std::string name() const override { return "HFGatedNormBackward"; }

    void release_variables() override {
        std::lock_guard<std::mutex> guard(mutex_);
        for (SavedVariable *v : {&x_, &z_, &w_, &rstd_}) v->reset_data();
    }

    variable_list apply(variable_list &&grads) override {
        std::lock_guard<std::mutex> guard(mutex_);
        const at::Tensor x = x_.unpack(), z = z_.unpack(), w = w_.unpack(), rstd = rstd_.unpack();
        return node_gradients(
            *this, grads,
            [&] { return gated_backward_launches(family_, family_of(family_), x, z, w, rstd, grads[0], offset_); },
            [&](bool graph, int64_t needs) {
                static const auto python = c10::Dispatcher::singleton()
                                               .findSchemaOrThrow(HF_NS_STR "::gated_backward", "")
                                               .typed<GatedBackward>();
                static const auto as_graph = c10::Dispatcher::singleton()
                                                 .findSchemaOrThrow(HF_NS_STR "::gated_graph_backward", "")
                                                 .typed<GatedBackward>();
                return (graph ? as_graph : python).call(grads[0], x, maybe(z), maybe(w), rstd, eps_, offset_, family_, needs);
            });
    }
};

// y, or an undefined tensor where no plan covers the call (the caller then takes the Python path)
at::Tensor gated_norm(const at::Tensor &x, const OptTensor &z, const OptTensor &w, double eps, double offset,
                      int64_t family) {
    const Family f = family_of(family);
    int64_t strides[2] = {0, 0};
    if (!gated_fits(f, x, z, w, eps, offset, strides)) return at::Tensor();
    c10::OptionalDeviceGuard device_guard;
    if (x.is_cuda()) device_guard.reset_device(x.device());
    const int64_t n = f.n, m = x.numel() / n, groups = n / f.s;
    at::Tensor y = at::empty(x.sizes(), x.options().dtype(f.y));
    at::Tensor rstd = at::empty({m * groups}, x.options().dtype(at::kFloat));
    const uintptr_t ptrs[kMaxPtrs] = {ptr(x), f.has_z ? ptr(z) : ptr(x), f.has_w ? ptr(w) : ptr(x), ptr(y), ptr(rstd)};
    const int64_t ints[kMaxInts] = {strides[0], strides[1], m, n, f.s, groups};
    const auto plan = find_plan(call_key(family, kGatedForward, ptrs, ints, gated_dense(kGatedForward, f, ints)));
    void *stream = nullptr;
    if (!plan || !stream_for(x, &stream)) return at::Tensor();
    const double floats[2] = {eps, offset};
    launch(*plan, kGatedForward, ptrs, ints, floats, groups * programs_for(*plan, m), stream);
    const at::Tensor zt = f.has_z ? *z : at::Tensor(), wt = f.has_w ? *w : at::Tensor();
    if (!torch::autograd::compute_requires_grad(x, zt, wt)) return y;
    auto node = record_node<GatedNormBackward>(y, x, zt, wt, eps, offset, family);
    node->x_ = SavedVariable(x, false);
    node->z_ = SavedVariable(zt, false);
    node->w_ = SavedVariable(wt, false);
    node->rstd_ = SavedVariable(rstd, false);
    return y;
}

int64_t new_gated_family(at::ScalarType x, std::optional<at::ScalarType> z, std::optional<at::ScalarType> w,
                         at::ScalarType y, int64_t n, int64_t s, int64_t device) {
    TORCH_CHECK(n > 0 && s > 0 && n % s == 0, "hf_rmsnorm's CUDA norm: groups of ", s, " do not divide ", n);
    Family f{x, w.value_or(at::ScalarType::Undefined), at::ScalarType::Undefined, y, n, device, 0, 0, true,
             w.has_value(), false};
    f.gated = true;
    f.has_z = z.has_value();
    f.z = z.value_or(at::ScalarType::Undefined);
    f.s = s;
    std::unique_lock<std::shared_mutex> write(lock);
    families.push_back(f);
    return static_cast<int64_t>(families.size()) - 1;
}

int64_t new_family(at::ScalarType x, std::optional<at::ScalarType> w, std::optional<at::ScalarType> b,
                   at::ScalarType y, int64_t n, int64_t device, bool is_rms, int64_t rounding, int64_t threshold) {
    Family f{x, w.value_or(at::ScalarType::Undefined), b.value_or(at::ScalarType::Undefined), y, n, device,
             threshold, rounding, is_rms, w.has_value(), b.has_value()};
    std::unique_lock<std::shared_mutex> write(lock);
    families.push_back(f);
    return static_cast<int64_t>(families.size()) - 1;
}

// The plan of a launch the Python path has just made, under that launch's facts: its pointers
// (0 for None) and integers as it passed them (the key is computed here, as a call computes it).
// ``width``: the gated backward's partial sums a program (0 for the other kernels).
void register_plan(int64_t family, int64_t kernel, std::vector<int64_t> ptrs, std::vector<int64_t> ints,
                   int64_t function, int64_t per_program, int64_t cap, int64_t block, int64_t shared,
                   std::vector<int64_t> kinds, int64_t width) {
    TORCH_CHECK(kernel >= kForward && kernel <= kGatedBackward, "hf_rmsnorm's CUDA norm: no kernel ", kernel);
    const int n_ptrs = kShape[kernel][0], n_ints = kShape[kernel][1], n_args = n_ptrs + n_ints + kShape[kernel][2];
    const Family f = family_of(family);
    const bool gated = kernel >= kGatedForward;
    TORCH_CHECK(gated == f.gated, "hf_rmsnorm's CUDA norm: kernel ", kernel, " is not family ", family, "'s");
    TORCH_CHECK(static_cast<int>(ptrs.size()) == n_ptrs && static_cast<int>(ints.size()) == n_ints &&
                    static_cast<int>(kinds.size()) == n_args && per_program > 0 && cap >= 0 && block > 0 &&
                    shared >= 0 && function != 0 && (width > 0) == (kernel == kGatedBackward && f.has_w) &&
                    width % per_program == 0,
                "hf_rmsnorm's CUDA norm: kernel ", kernel, "'s plan needs ", n_ptrs, " pointers, ", n_ints,
                " integers, ", n_args, " argument kinds, programs' rows, a block size and a function");
    uintptr_t addresses[kMaxPtrs] = {};
    for (int i = 0; i < n_ptrs; ++i) addresses[i] = static_cast<uintptr_t>(ptrs[i]);
    for (int i = 0; i < n_args; ++i) {  // a pointer where a pointer is, a number where a number is
        const int64_t kind = kinds[i];
        const bool ok = i < n_ptrs ? kind == kPtr || (kind == kConst && addresses[i] == 0)
                        : i < n_ptrs + n_ints ? kind == kConst || kind == kI32 || kind == kI64
                                              : kind == kF32;
        TORCH_CHECK(ok, "hf_rmsnorm's CUDA norm: argument ", i, " of kernel ", kernel, " cannot be packed as kind ", kind);
    }
    Plan plan;
    plan.function = reinterpret_cast<void *>(static_cast<uintptr_t>(function));
    plan.per_program = per_program;
    plan.cap = cap;
    plan.block = static_cast<unsigned>(block);
    plan.shared = static_cast<unsigned>(shared);
    plan.width = width;
    std::copy(kinds.begin(), kinds.end(), plan.kinds.begin());
    const bool fact = gated ? gated_dense(kernel, f, ints.data()) : kernel == kForward && ints[1] >= f.threshold;
    const uint64_t key = call_key(family, kernel, addresses, ints.data(), fact);
    std::unique_lock<std::shared_mutex> write(lock);
    if (kernel == kGatedBackward) {  // the tile's rows, the same for every plan of the family (its S's)
        TORCH_CHECK(families[family].tile_rows == 0 || families[family].tile_rows == per_program,
                    "hf_rmsnorm's CUDA norm: family ", family, "'s backward tiles hold ", families[family].tile_rows,
                    " rows, not ", per_program);
        families[family].tile_rows = per_program;
    }
    plans[key] = plan;
}

// "" where the driver's functions were found, else what is missing
std::string load_driver() {
    if (launch_fn.load() != nullptr && ctx_fn.load() != nullptr) return "";
    auto launch = reinterpret_cast<LaunchFn>(driver_symbol("cuLaunchKernel"));
    auto ctx = reinterpret_cast<CtxFn>(driver_symbol("cuCtxGetCurrent"));
    if (launch == nullptr || ctx == nullptr) return "libcuda.so.1 or its cuLaunchKernel / cuCtxGetCurrent not found";
    launch_fn = launch;
    ctx_fn = ctx;
    return "";
}

// a launch function that launches nothing: the host time of the operator alone, on any machine
// (benchmark_cpu.py --launcher)
int noop_launch(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void *, void **, void **) {
    return 0;
}

int64_t noop_launch_address() { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(&noop_launch)); }

// the tests' launch function (an address; 0 puts the driver's back)
void set_launch_function(int64_t address) {
    if (address == 0) {
        launch_fn = nullptr;
        ctx_fn = nullptr;
        stubbed = false;
        load_driver();
        return;
    }
    launch_fn = reinterpret_cast<LaunchFn>(static_cast<uintptr_t>(address));
    stubbed = true;
}

// the current stream's handle on a CUDA device, as the operator launches on it (the GPU tests
// compare it with torch.cuda.current_stream().cuda_stream)
int64_t current_stream(int64_t device) {
    const c10::Device d(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device));
    return static_cast<int64_t>(
        reinterpret_cast<uintptr_t>(c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(d).native_handle()));
}

// launches the operator has made of each kernel: forward, backward, sums, gated forward, gated backward
std::vector<int64_t> launch_counts() {
    std::vector<int64_t> counts;
    for (const auto &count : launches) counts.push_back(count.load());
    return counts;
}

int64_t plan_count() {
    std::shared_lock<std::shared_mutex> read(lock);
    return static_cast<int64_t>(plans.size());
}

}  // namespace

HF_RMSNORM_LIBRARY(HF_RMSNORM_NS, m) {
    m.def("norm(Tensor x, Tensor? weight, Tensor? bias, float eps, float offset, int family) -> Tensor");
    // implemented in Python (_cuda_launch.py): the backward kernels, and the torch reference's
    // gradients as a graph for second derivatives; `needs` has a bit per input (x, weight, bias)
    m.def("backward(Tensor grad, Tensor x, Tensor? weight, Tensor? bias, Tensor? mean, Tensor rstd, float eps, "
          "float offset, int family, int needs) -> Tensor[]");
    m.def("graph_backward(Tensor grad, Tensor x, Tensor? weight, Tensor? bias, Tensor? mean, Tensor rstd, float eps, "
          "float offset, int family, int needs) -> Tensor[]");
    // the gated norm's, alike
    m.def("gated_norm(Tensor x, Tensor? gate, Tensor? weight, float eps, float offset, int family) -> Tensor");
    m.def("gated_backward(Tensor grad, Tensor x, Tensor? gate, Tensor? weight, Tensor rstd, float eps, float offset, "
          "int family, int needs) -> Tensor[]");
    m.def("gated_graph_backward(Tensor grad, Tensor x, Tensor? gate, Tensor? weight, Tensor rstd, float eps, "
          "float offset, int family, int needs) -> Tensor[]");
    m.def("new_gated_family", &new_gated_family);
    m.def("new_family", &new_family);
    m.def("register_plan", &register_plan);
    m.def("load_driver", &load_driver);
    m.def("set_launch_function", &set_launch_function);
    m.def("noop_launch_address", &noop_launch_address);
    m.def("current_stream", &current_stream);
    m.def("launch_counts", &launch_counts);
    m.def("plan_count", &plan_count);
}

HF_RMSNORM_LIBRARY_IMPL(HF_RMSNORM_NS, CompositeImplicitAutograd, m) {
    m.impl("norm", &norm);
    m.impl("gated_norm", &gated_norm);
}
