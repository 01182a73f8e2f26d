// The norm forward on CUDA as one torch operator: it allocates the outputs, launches the
// Triton-compiled forward kernel with the CUDA driver's cuLaunchKernel and records a C++
// autograd node, with no Python between the call and the launch.
//
// Why: in a training forward the host time of each norm call is step time where the host paces
// the step (GPT-2-medium in bf16 on an H200, benchmarks/NOTES.md run 14b), and a Python
// autograd.Function around Triton's launch costs several times torch's own norm there (run 14c:
// 92-140 us a call against F.layer_norm's 23-31). torch's norms are one C++ operator that
// allocates, launches and records a C++ node; this is the same for the compiled Triton kernel.
//
// What stays in Python (_cuda_launch.py): which kernel, grid and arguments a call needs. The
// first call of each kind goes through the Python path, which compiles the kernel, and then
// registers a plan here: the kernel's CUfunction, its launch shape and which of its arguments
// Triton kept (an integer equal to 1 and an absent tensor become constants and are not passed),
// under what Triton specialised the call on (each pointer's presence and 16-byte alignment, each
// integer's being 1, its divisibility by 16 and its width) and the row-count threshold that
// picks the tiles. A call whose facts have no plan returns an undefined tensor (None in Python):
// the Python path runs it and registers its plan. The parameters are packed as Triton 3.6-3.9's
// launchers pack them (their driver.py): each kept argument, then the global and the profile
// scratch pointers, null here (a plan is registered only for kernels that need neither).
//
// The backward stays in Python: the node calls the backward that _cuda_launch.py registers for
// this library (the kernels of _norm._bwd_impl; the GPU paces the backward, run 14b), or for
// create_graph=True the torch reference's gradients as a graph.
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

#include <dlfcn.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#define HF_STR2(s) #s
#define HF_STR(s) HF_STR2(s)
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

// the forward kernel's leading arguments (_triton_norm._norm_fwd_kernel): x, y, weight, bias,
// mean, rstd, stride_x, M, N, eps, offset
constexpr int kArgs = 11, kPointers = 6;
// how a kept argument is packed (_cuda_launch.py's KINDS): 0 not passed (a constant in the kernel)
enum Kind : int64_t { kConst = 0, kPtr = 1, kI32 = 2, kI64 = 3, kF32 = 4 };

struct Family {  // what every call of one norm signature shares (_cuda_launch.py, family)
    at::ScalarType x, w, b, y;  // b, w: Undefined where absent
    int64_t n = 0, device = -1, threshold = 0, rounding = 0;
    bool is_rms = false, has_w = false, has_b = false;
};

struct Plan {  // one compiled kernel and how to launch it
    void *function = nullptr;
    int64_t rows_per_program = 1;
    unsigned block = 32, shared = 0;
    std::array<int64_t, kArgs> kinds{};
};

std::shared_mutex lock;  // registrations are rare (one per kind of call), lookups every call
std::vector<Family> families;
std::unordered_map<uint64_t, Plan> plans;
std::atomic<LaunchFn> launch_fn{nullptr};
std::atomic<CtxFn> ctx_fn{nullptr};
std::atomic<bool> stubbed{false};  // a launch function set by the tests: CPU tensors allowed, no context
std::atomic<int64_t> launches{0};

void *driver_symbol(const char *name) {
    void *lib = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_NOLOAD);  // loaded by torch and Triton already
    if (lib == nullptr) lib = dlopen("libcuda.so.1", RTLD_LAZY);
    return lib == nullptr ? nullptr : dlsym(lib, name);
}

// What Triton specialises an integer argument on: equal to 1, divisible by 16, 64 bits wide.
uint32_t int_facts(int64_t v) {
    return (v == 1 ? 1u : 0u) | (v % 16 == 0 ? 2u : 0u) | (v < INT32_MIN || v > INT32_MAX ? 4u : 0u);
}

// The key of a call: its family, then two bits per pointer (present, 16-byte aligned), three per
// integer, and whether the row count reaches the family's threshold (fwd_tiles's choice).
uint64_t call_key(int64_t family, const std::array<const void *, kPointers> &ptrs,
                  const std::array<int64_t, 3> &ints, bool many_rows) {
    uint64_t bits = many_rows ? 1u : 0u, shift = 1;
    for (const void *p : ptrs) {
        const auto address = reinterpret_cast<uintptr_t>(p);
        bits |= uint64_t((address != 0 ? 1u : 0u) | (address % 16 == 0 ? 2u : 0u)) << shift;
        shift += 2;
    }
    for (int64_t v : ints) {
        bits |= uint64_t(int_facts(v)) << shift;
        shift += 3;
    }
    return (uint64_t(family) << 32) | bits;  // 22 bits of facts
}

const void *ptr(const at::Tensor &t) { return t.defined() ? t.const_data_ptr() : nullptr; }
const void *ptr(const OptTensor &t) { return t.has_value() && t->defined() ? t->const_data_ptr() : nullptr; }
OptTensor maybe(const at::Tensor &t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// a copy: a registration from another thread may grow (and move) the vector once the lock is left
Family family_of(int64_t id) {
    std::shared_lock<std::shared_mutex> read(lock);
    TORCH_CHECK(id >= 0 && id < static_cast<int64_t>(families.size()), "hf_rmsnorm's CUDA norm: no family ", id);
    return families[id];
}

// The call as the family promises it (the operator is visible in torch.ops: no call may make the
// kernel read memory the tensors do not have); false where the Python path must take it.
bool fits(const Family &f, const at::Tensor &x, const OptTensor &w, const OptTensor &b) {
    const bool has_w = w.has_value() && w->defined(), has_b = b.has_value() && b->defined();
    TORCH_CHECK(x.dim() >= 1 && x.size(-1) == f.n && x.scalar_type() == f.x && has_w == f.has_w && has_b == f.has_b &&
                    (!has_w || (w->scalar_type() == f.w && w->dim() == 1 && w->size(0) == f.n && w->is_contiguous() &&
                                w->device() == x.device())) &&
                    (!has_b || (b->scalar_type() == f.b && b->dim() == 1 && b->size(0) == f.n && b->is_contiguous() &&
                                b->device() == x.device())),
                "hf_rmsnorm's CUDA norm: the call does not match its family (", x.scalar_type(), " ", x.sizes(), ")");
    return x.is_contiguous() && x.numel() > 0 && (x.is_cuda() ? x.get_device() == f.device : stubbed.load());
}

// (M, N, row stride) as _triton_norm._row_layout reads a contiguous x
std::array<int64_t, 3> layout(const at::Tensor &x) {
    const int64_t n = x.size(-1), m = x.numel() / n;
    return {x.dim() == 2 ? x.stride(0) : n, m, n};
}

// the outputs: y, mean (undefined for RMSNorm), rstd
std::array<at::Tensor, 3> outputs(const Family &f, const at::Tensor &x, int64_t m) {
    const auto stats = x.options().dtype(at::kFloat);
    return {at::empty(x.sizes(), x.options().dtype(f.y)), f.is_rms ? at::Tensor() : at::empty({m}, stats),
            at::empty({m}, stats)};
}

// the backward (_norm._bwd_impl) and, for create_graph=True, the torch reference's gradients as
// a graph, both implemented in Python (_cuda_launch.py); each returns the wanted gradients in order
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
        const at::Tensor x = x_.unpack(), w = w_.unpack(), b = b_.unpack();
        const bool need[3] = {task_should_compute_output(0), task_should_compute_output(1),
                              task_should_compute_output(2)};
        variable_list out(3);
        if (!grads[0].defined()) return out;  // no gradient reached y
        const int64_t needs = need[0] | (need[1] << 1) | (need[2] << 2);
        // the two are looked up once: the namespace is this build's
        static const auto backward = c10::Dispatcher::singleton()
                                         .findSchemaOrThrow(HF_NS_STR "::backward", "")
                                         .typed<Backward>();
        static const auto graph = c10::Dispatcher::singleton()
                                      .findSchemaOrThrow(HF_NS_STR "::graph_backward", "")
                                      .typed<Backward>();
        // create_graph=True: the kernels have no second derivative, the torch reference has
        const auto &op = at::GradMode::is_enabled() ? graph : backward;
        const auto wanted = op.call(grads[0], x, maybe(w), maybe(b), maybe(mean_.unpack()), rstd_.unpack(), eps_,
                                    offset_, family_, needs);
        size_t i = 0;
        for (int k = 0; k < 3; ++k)
            if (need[k]) out[k] = wanted.at(i++);
        return out;
    }
};

template <class T>
auto make_node() {  // a node as this torch version holds them (intrusive, or shared before ~2.12)
    if constexpr (std::is_same_v<decltype(torch::autograd::Edge::function), std::shared_ptr<torch::autograd::Node>>)
        return std::make_shared<T>();
    else
        return c10::make_intrusive<T>();
}

// y, or an undefined tensor where no plan covers the call (the caller then takes the Python path)
at::Tensor norm(const at::Tensor &x, const OptTensor &w, const OptTensor &b, double eps, double offset, int64_t family) {
    const Family f = family_of(family);
    if (!fits(f, x, w, b)) return at::Tensor();
    c10::OptionalDeviceGuard device_guard;
    if (x.is_cuda()) device_guard.reset_device(x.device());  // a model spread over GPUs: x's device current
    const auto [stride, m, n] = layout(x);
    auto [y, mean, rstd] = outputs(f, x, m);
    const std::array<const void *, kPointers> ptrs = {ptr(x), ptr(y), ptr(w), ptr(b), ptr(mean), ptr(rstd)};
    const std::array<int64_t, 3> ints = {stride, m, n};
    const uint64_t key = call_key(family, ptrs, ints, m >= f.threshold);
    Plan plan;
    {
        std::shared_lock<std::shared_mutex> read(lock);
        const auto found = plans.find(key);
        if (found == plans.end()) return at::Tensor();
        plan = found->second;
    }
    void *stream = nullptr;
    if (x.is_cuda()) {
        void *context = nullptr;
        // Triton's launcher makes a context current where a thread has none; the Python path does that
        if (ctx_fn.load()(&context) != 0 || context == nullptr) return at::Tensor();
        stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(x.device()).native_handle();
    }
    // the values, then a pointer to each kept one, then the two scratch pointers
    uint64_t values[kArgs];
    void *params[kArgs + 2];
    uint64_t scratch[2] = {0, 0};
    int kept = 0;
    for (int i = 0; i < kArgs; ++i) {
        const int64_t kind = plan.kinds[i];
        if (kind == kConst) continue;
        if (kind == kPtr) {
            values[i] = reinterpret_cast<uintptr_t>(ptrs[i]);
        } else if (kind == kI32) {
            const auto v = static_cast<int32_t>(ints[i - kPointers]);
            std::memcpy(&values[i], &v, sizeof v);
        } else if (kind == kI64) {
            values[i] = static_cast<uint64_t>(ints[i - kPointers]);
        } else {  // kF32: eps, offset
            const auto v = static_cast<float>(i == kArgs - 2 ? eps : offset);
            std::memcpy(&values[i], &v, sizeof v);
        }
        params[kept++] = &values[i];
    }
    params[kept++] = &scratch[0];
    params[kept++] = &scratch[1];
    const int64_t programs = (m + plan.rows_per_program - 1) / plan.rows_per_program;
    const int status = launch_fn.load()(plan.function, static_cast<unsigned>(programs), 1, 1, plan.block, 1, 1,
                                        plan.shared, stream, params, nullptr);
    TORCH_CHECK(status == 0, "hf_rmsnorm's CUDA norm: cuLaunchKernel failed with CUresult ", status,
                " (set HF_RMSNORM_CPP_LAUNCH=0 to launch through Triton instead)");
    ++launches;
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

// The plan of a call the Python path has just launched, under that call's facts: its tensors and
// integers as that launch passed them (the key is computed here, as a call computes it).
void register_plan(int64_t family, const at::Tensor &x, const at::Tensor &y, const OptTensor &w, const OptTensor &b,
                   const OptTensor &mean, const at::Tensor &rstd, int64_t stride, int64_t m, int64_t n,
                   int64_t function, int64_t rows_per_program, int64_t block, int64_t shared,
                   std::vector<int64_t> kinds) {
    const Family f = family_of(family);
    TORCH_CHECK(kinds.size() == kArgs && rows_per_program > 0 && block > 0 && shared >= 0 && function != 0,
                "hf_rmsnorm's CUDA norm: a plan needs ", kArgs, " argument kinds, rows a program, a block size and a function");
    const std::array<const void *, kPointers> ptrs = {ptr(x), ptr(y), ptr(w), ptr(b), ptr(mean), ptr(rstd)};
    for (int i = 0; i < kArgs; ++i) {  // a pointer where a pointer is, a number where a number is
        const int64_t kind = kinds[i];
        const bool ok = i < kPointers ? kind == kPtr || (kind == kConst && ptrs[i] == nullptr)
                        : i < kPointers + 3 ? kind == kConst || kind == kI32 || kind == kI64
                                            : kind == kF32;
        TORCH_CHECK(ok, "hf_rmsnorm's CUDA norm: argument ", i, " cannot be packed as kind ", kind);
    }
    Plan plan;
    plan.function = reinterpret_cast<void *>(static_cast<uintptr_t>(function));
    plan.rows_per_program = rows_per_program;
    plan.block = static_cast<unsigned>(block);
    plan.shared = static_cast<unsigned>(shared);
    std::copy(kinds.begin(), kinds.end(), plan.kinds.begin());
    const uint64_t key = call_key(family, ptrs, {stride, m, n}, m >= f.threshold);
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

int64_t launch_count() { return launches.load(); }

int64_t plan_count() {
    std::shared_lock<std::shared_mutex> read(lock);
    return static_cast<int64_t>(plans.size());
}

}  // namespace

TORCH_LIBRARY(HF_RMSNORM_NS, m) {
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
    m.def("launch_count", &launch_count);
    m.def("plan_count", &plan_count);
}

TORCH_LIBRARY_IMPL(HF_RMSNORM_NS, CompositeImplicitAutograd, m) { m.impl("norm", &norm); }
