// A norm on CUDA as one torch operator: it allocates the outputs, launches the Triton-compiled
// forward kernel with the CUDA driver's cuLaunchKernel and records a C++ autograd node, whose
// backward launches the backward kernel and the partial sums the same way, with no Python between
// a call and its launches.
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
// gradients as a graph (Python), the kernels having no second derivative.
//
// Built by _cpu_kernel.py's builder on first use with torch's headers and no CUDA headers: the
// driver's types are opaque pointers here, the stream comes from c10's device-generic interface.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include "_op_shared.h"  // make_node, plain, backend_is_one_of

#include <dlfcn.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#define HF_NS_STR HF_STR(HF_RMSNORM_NS)

namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

// CUresult cuLaunchKernel(CUfunction, gridX, gridY, gridZ, blockX, blockY, blockZ, sharedBytes,
// CUstream, void **params, void **extra), CUresult cuCtxGetCurrent(CUcontext *)
using LaunchFn = int (*)(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void *, void **,
                         void **);
using CtxFn = int (*)(void **);

// The kernels the operator launches (_triton_norm's), each by its leading non-constexpr
// arguments: pointers first, then integers, then floats.
//   forward:  x, y, weight, bias, mean, rstd | stride_x, M, N | eps, offset
//   backward: x, weight, dy, dx, partials, mean, rstd | stride_x, stride_dy, M, N | offset
//   sums:     partials, dweight-or-dbias, dbias | rows, columns, N
enum Kernel : int64_t { kForward = 0, kBackward = 1, kSums = 2 };
constexpr int kMaxArgs = 12, kMaxPtrs = 7, kMaxInts = 4;
constexpr int kShape[3][3] = {{6, 3, 2}, {7, 4, 1}, {3, 3, 0}};  // pointers, integers, floats
// how a kept argument is packed (_cuda_launch.py's KINDS): 0 not passed (a constant in the kernel)
enum Kind : int64_t { kConst = 0, kPtr = 1, kI32 = 2, kI64 = 3, kF32 = 4 };
constexpr int64_t kRoundToWeight = 2;  // _norm.ROUNDING["weight"]

struct Family {  // what every call of one norm signature shares (_cuda_launch.py, family)
    at::ScalarType x, w, b, y;  // b, w: Undefined where absent
    int64_t n = 0, device = -1, threshold = 0, rounding = 0;
    bool is_rms = false, has_w = false, has_b = false;
};

struct Plan {  // one compiled kernel and how to launch it
    void *function = nullptr;
    // programs: ceil(count / per_program), at most cap (0: no cap); count is the row count, or
    // the columns for the sums
    int64_t per_program = 1, cap = 0;
    unsigned block = 32, shared = 0;
    std::array<int64_t, kMaxArgs> kinds{};
};

std::shared_mutex lock;  // registrations are rare (one per kind of call), lookups every call
std::vector<Family> families;
std::unordered_map<uint64_t, Plan> plans;
std::atomic<LaunchFn> launch_fn{nullptr};
std::atomic<CtxFn> ctx_fn{nullptr};
std::atomic<bool> stubbed{false};  // a launch function set by the tests: CPU tensors allowed, no context
std::atomic<int64_t> launches[3] = {0, 0, 0};

void *driver_symbol(const char *name) {
    void *lib = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_NOLOAD);  // loaded by torch and Triton already
    if (lib == nullptr) lib = dlopen("libcuda.so.1", RTLD_LAZY);
    return lib == nullptr ? nullptr : dlsym(lib, name);
}

// What Triton specialises an integer argument on: equal to 1, divisible by 16, 64 bits wide.
uint32_t int_facts(int64_t v) {
    return (v == 1 ? 1u : 0u) | (v % 16 == 0 ? 2u : 0u) | (v < INT32_MIN || v > INT32_MAX ? 4u : 0u);
}

// The key of a launch: its family and kernel, then two bits per pointer (present, 16-byte
// aligned), three per integer, and for the forward whether the row count reaches the family's
// threshold (fwd_tiles's choice). At most 1 + 2 * 7 + 3 * 4 = 27 bits of facts.
uint64_t call_key(int64_t family, int64_t kernel, const uintptr_t *ptrs, const int64_t *ints, bool many_rows) {
    uint64_t bits = many_rows ? 1u : 0u, shift = 1;
    for (int i = 0; i < kShape[kernel][0]; ++i) {
        bits |= uint64_t((ptrs[i] != 0 ? 1u : 0u) | (ptrs[i] % 16 == 0 ? 2u : 0u)) << shift;
        shift += 2;
    }
    for (int i = 0; i < kShape[kernel][1]; ++i) {
        bits |= uint64_t(int_facts(ints[i])) << shift;
        shift += 3;
    }
    return (uint64_t(family) << 32) | (uint64_t(kernel) << 28) | bits;
}

std::optional<Plan> find_plan(uint64_t key) {
    std::shared_lock<std::shared_mutex> read(lock);
    const auto found = plans.find(key);
    if (found == plans.end()) return std::nullopt;
    return found->second;
}

uintptr_t ptr(const at::Tensor &t) { return t.defined() ? reinterpret_cast<uintptr_t>(t.const_data_ptr()) : 0; }
uintptr_t ptr(const OptTensor &t) { return t.has_value() ? ptr(*t) : 0; }
OptTensor maybe(const at::Tensor &t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// a copy: a registration from another thread may grow (and move) the vector once the lock is left
Family family_of(int64_t id) {
    std::shared_lock<std::shared_mutex> read(lock);
    TORCH_CHECK(id >= 0 && id < static_cast<int64_t>(families.size()), "hf_rmsnorm's CUDA norm: no family ", id);
    return families[id];
}

// A parameter as the family promises it: present where it has one, of its dtype and length,
// contiguous, on x's device.
bool param_fits(const OptTensor &p, bool has, at::ScalarType dtype, const Family &f, const at::Tensor &x) {
    const bool present = p.has_value() && p->defined();
    return present == has && (!present || (plain(*p) && p->scalar_type() == dtype && p->dim() == 1 &&
                                           p->size(0) == f.n && p->is_contiguous() && p->device() == x.device()));
}

// Whether the call is as the family promises it; false where the Python path must take it. A
// module's settled call passes the family its earlier call found without asking again (the
// module's parameters can be replaced or converted, its input can be anything), and the operator
// is visible in torch.ops: no call may make a kernel read memory the tensors do not have, or
// compute what the family's kernels do not (a weightless call with an offset, or rounding to the
// weight's dtype, is the general path's to refuse).
bool fits(const Family &f, const at::Tensor &x, const OptTensor &w, const OptTensor &b, double eps, double offset) {
    return plain(x) && x.dim() >= 1 && x.size(-1) == f.n && x.scalar_type() == f.x && x.is_contiguous() &&
           x.numel() > 0 && (x.is_cuda() ? x.get_device() == f.device : stubbed.load()) &&
           param_fits(w, f.has_w, f.w, f, x) && param_fits(b, f.has_b, f.b, f, x) && eps >= 0 &&
           (f.has_w || (offset == 0 && f.rounding != kRoundToWeight)) && backend_is_one_of({"", "auto", "triton"});
}

// (row stride, M, N) as _triton_norm._row_layout reads a contiguous tensor of rows
std::array<int64_t, 3> layout(const at::Tensor &t) {
    const int64_t n = t.size(-1), m = t.numel() / n;
    return {t.dim() == 2 ? t.stride(0) : n, m, n};
}

// The stream to launch on (torch's current one on x's device), or false where this thread has
// no CUDA context current: Triton's launcher makes one current, and the Python path does that.
bool stream_for(const at::Tensor &x, void **stream) {
    *stream = nullptr;
    if (!x.is_cuda()) return true;  // the tests' stub launch
    void *context = nullptr;
    if (ctx_fn.load()(&context) != 0 || context == nullptr) return false;
    *stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(x.device()).native_handle();
    return true;
}

// Launch ``plan`` over ``count`` rows (columns for the sums), its parameters packed as Triton's
// launchers pack them: each kept argument, then the global and the profile scratch pointers.
void launch(const Plan &plan, int64_t kernel, const uintptr_t *ptrs, const int64_t *ints, const double *floats,
            int64_t count, void *stream) {
    const int n_ptrs = kShape[kernel][0], n_ints = kShape[kernel][1], n_args = n_ptrs + n_ints + kShape[kernel][2];
    uint64_t values[kMaxArgs];
    void *params[kMaxArgs + 2];
    uint64_t scratch[2] = {0, 0};
    int kept = 0;
    for (int i = 0; i < n_args; ++i) {
        const int64_t kind = plan.kinds[i];
        if (kind == kConst) continue;
        if (kind == kPtr) {
            values[i] = ptrs[i];
        } else if (kind == kI32) {
            const auto v = static_cast<int32_t>(ints[i - n_ptrs]);
            std::memcpy(&values[i], &v, sizeof v);
        } else if (kind == kI64) {
            values[i] = static_cast<uint64_t>(ints[i - n_ptrs]);
        } else {  // kF32
            const auto v = static_cast<float>(floats[i - n_ptrs - n_ints]);
            std::memcpy(&values[i], &v, sizeof v);
        }
        params[kept++] = &values[i];
    }
    params[kept++] = &scratch[0];
    params[kept++] = &scratch[1];
    int64_t programs = (count + plan.per_program - 1) / plan.per_program;
    if (plan.cap > 0 && programs > plan.cap) programs = plan.cap;
    const int status = launch_fn.load()(plan.function, static_cast<unsigned>(programs), 1, 1, plan.block, 1, 1,
                                        plan.shared, stream, params, nullptr);
    TORCH_CHECK(status == 0, "hf_rmsnorm's CUDA norm: cuLaunchKernel failed with CUresult ", status,
                " (set HF_RMSNORM_CPP_LAUNCH=0 to launch from Python instead)");
    ++launches[kernel];
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
    int64_t programs = (m + bwd->per_program - 1) / bwd->per_program;
    if (bwd->cap > 0 && programs > bwd->cap) programs = bwd->cap;
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
    launch(*bwd, kBackward, ptrs, ints, floats, m, stream);
    if (columns) launch(*sum, kSums, sum_ptrs, sum_ints, nullptr, columns, stream);
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

struct NormBackward : public torch::autograd::Node {
    SavedVariable x_, w_, b_, mean_, rstd_;
    double eps_ = 0, offset_ = 0;
    int64_t family_ = 0;

    std::string name() const override { return "HFNormBackward"; }

    void release_variables() override {
        std::lock_guard<std::mutex> guard(mutex_);
        for (SavedVariable *v : {&x_, &w_, &b_, &mean_, &rstd_}) v->reset_data();
    }

    variable_list apply(variable_list &&grads) override {
        std::lock_guard<std::mutex> guard(mutex_);
        const at::Tensor x = x_.unpack(), w = w_.unpack(), b = b_.unpack(), mean = mean_.unpack(), rstd = rstd_.unpack();
        const bool need[3] = {task_should_compute_output(0), task_should_compute_output(1),
                              task_should_compute_output(2)};
        variable_list out(3);
        if (!grads[0].defined()) return out;  // no gradient reached y
        const bool graph = at::GradMode::is_enabled();  // create_graph=True
        if (!graph) {
            const auto launched = backward_launches(family_, family_of(family_), x, w, mean, rstd, grads[0], offset_);
            if (launched) {
                for (int k = 0; k < 3; ++k)
                    if (need[k]) out[k] = (*launched)[k];
                return out;
            }
        }
        // looked up once: the namespace is this build's
        static const auto python = c10::Dispatcher::singleton()
                                       .findSchemaOrThrow(HF_NS_STR "::backward", "")
                                       .typed<Backward>();
        static const auto as_graph = c10::Dispatcher::singleton()
                                         .findSchemaOrThrow(HF_NS_STR "::graph_backward", "")
                                         .typed<Backward>();
        // create_graph=True: the kernels have no second derivative, the torch reference has
        const auto wanted = (graph ? as_graph : python)
                                .call(grads[0], x, maybe(w), maybe(b), maybe(mean), rstd, eps_, offset_, family_,
                                      need[0] | (need[1] << 1) | (need[2] << 2));
        size_t i = 0;
        for (int k = 0; k < 3; ++k)
            if (need[k]) out[k] = wanted.at(i++);
        return out;
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
    launch(*plan, kForward, ptrs, ints, floats, m, stream);
    if (!torch::autograd::compute_requires_grad(x, w, b)) return y;
    auto node = make_node<NormBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(x, w, b));
    node->x_ = SavedVariable(x, false);
    node->w_ = SavedVariable(w.has_value() ? *w : at::Tensor(), false);
    node->b_ = SavedVariable(b.has_value() ? *b : at::Tensor(), false);
    node->mean_ = SavedVariable(mean, false);
    node->rstd_ = SavedVariable(rstd, false);
    node->eps_ = eps;
    node->offset_ = offset;
    node->family_ = family;
    torch::autograd::set_history(y, node);
    return y;
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
void register_plan(int64_t family, int64_t kernel, std::vector<int64_t> ptrs, std::vector<int64_t> ints,
                   int64_t function, int64_t per_program, int64_t cap, int64_t block, int64_t shared,
                   std::vector<int64_t> kinds) {
    TORCH_CHECK(kernel >= kForward && kernel <= kSums, "hf_rmsnorm's CUDA norm: no kernel ", kernel);
    const int n_ptrs = kShape[kernel][0], n_ints = kShape[kernel][1], n_args = n_ptrs + n_ints + kShape[kernel][2];
    const Family f = family_of(family);
    TORCH_CHECK(static_cast<int>(ptrs.size()) == n_ptrs && static_cast<int>(ints.size()) == n_ints &&
                    static_cast<int>(kinds.size()) == n_args && per_program > 0 && cap >= 0 && block > 0 &&
                    shared >= 0 && function != 0,
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
    std::copy(kinds.begin(), kinds.end(), plan.kinds.begin());
    const uint64_t key = call_key(family, kernel, addresses, ints.data(), kernel == kForward && ints[1] >= f.threshold);
    std::unique_lock<std::shared_mutex> write(lock);
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

// launches the operator has made of each kernel: forward, backward, sums
std::vector<int64_t> launch_counts() { return {launches[0].load(), launches[1].load(), launches[2].load()}; }

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
    m.def("new_family", &new_family);
    m.def("register_plan", &register_plan);
    m.def("load_driver", &load_driver);
    m.def("set_launch_function", &set_launch_function);
    m.def("noop_launch_address", &noop_launch_address);
    m.def("current_stream", &current_stream);
    m.def("launch_counts", &launch_counts);
    m.def("plan_count", &plan_count);
}

HF_RMSNORM_LIBRARY_IMPL(HF_RMSNORM_NS, CompositeImplicitAutograd, m) { m.impl("norm", &norm); }
