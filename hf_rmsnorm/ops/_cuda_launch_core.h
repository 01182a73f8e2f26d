// The launch machinery the C++ launch operator's norms share (_cuda_launch_op.cpp, whose first
// comment says what the operator is and why): the kernels it knows and their arguments, the
// families and plans registered from Python, the key a call's facts make, and the launch itself
// with the CUDA driver's cuLaunchKernel. One translation unit includes it: its state lives in an
// anonymous namespace.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/autograd/function.h>

#include "_op_shared.h"  // make_node, plain, backend_is_one_of

#include <dlfcn.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <optional>
#include <shared_mutex>
#include <unordered_map>
#include <vector>

namespace {

using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

// CUresult cuLaunchKernel(CUfunction, gridX, gridY, gridZ, blockX, blockY, blockZ, sharedBytes,
// CUstream, void **params, void **extra), CUresult cuCtxGetCurrent(CUcontext *)
using LaunchFn = int (*)(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void *, void **,
                         void **);
using CtxFn = int (*)(void **);

// The kernels the operator launches (_triton_norm's, then _triton_gated's), each by its leading
// non-constexpr arguments: pointers first, then integers, then floats.
//   forward:  x, y, weight, bias, mean, rstd | stride_x, M, N | eps, offset
//   backward: x, weight, dy, dx, partials, mean, rstd | stride_x, stride_dy, M, N | offset
//   sums:     partials, dweight-or-dbias, dbias | rows, columns, N
//   gated forward:  x, gate, weight, y, rstd | stride_x, stride_gate, M, N, S, G | eps, offset
//   gated backward: dy, x, gate, weight, rstd, dx, dgate, partials
//                   | stride_dy, stride_x, stride_gate, M, N, S, G, tiles | offset
// (the gated kernels take x in place of an absent gate or weight, dx in place of an absent
// dgate or partials: pointers never read or written, as the Python launchers pass them)
enum Kernel : int64_t { kForward = 0, kBackward = 1, kSums = 2, kGatedForward = 3, kGatedBackward = 4 };
constexpr int kKernels = 5, kMaxArgs = 17, kMaxPtrs = 8, kMaxInts = 8;
constexpr int kShape[kKernels][3] = {{6, 3, 2}, {7, 4, 1}, {3, 3, 0}, {5, 6, 2}, {8, 8, 1}};  // pointers, integers, floats
// how a kept argument is packed (_cuda_launch.py's KINDS): 0 not passed (a constant in the kernel)
enum Kind : int64_t { kConst = 0, kPtr = 1, kI32 = 2, kI64 = 3, kF32 = 4 };
constexpr int64_t kRoundToWeight = 2;  // _norm.ROUNDING["weight"]

struct Family {  // what every call of one norm signature shares (_cuda_launch.py, family)
    at::ScalarType x, w, b, y;  // b, w: Undefined where absent
    int64_t n = 0, device = -1, threshold = 0, rounding = 0;
    bool is_rms = false, has_w = false, has_b = false;
    // a gated norm's: its gate's dtype (b is Undefined), its group size, and its backward's rows
    // a tile (0 until a backward plan is registered: the tile count, one of the backward's
    // integers, is needed to find a plan)
    bool gated = false, has_z = false;
    at::ScalarType z = at::ScalarType::Undefined;
    int64_t s = 0, tile_rows = 0;
};

struct Plan {  // one compiled kernel and how to launch it
    void *function = nullptr;
    // programs: ceil(count / per_program), at most cap (0: no cap); count is the row count, or
    // the columns for the sums
    int64_t per_program = 1, cap = 0;
    int64_t width = 0;  // the gated backward's: a program's row of partial sums (0 for the others)
    unsigned block = 32, shared = 0;
    std::array<int64_t, kMaxArgs> kinds{};
};

std::shared_mutex lock;  // registrations are rare (one per kind of call), lookups every call
std::vector<Family> families;
std::unordered_map<uint64_t, Plan> plans;
std::atomic<LaunchFn> launch_fn{nullptr};
std::atomic<CtxFn> ctx_fn{nullptr};
std::atomic<bool> stubbed{false};  // a launch function set by the tests: CPU tensors allowed, no context
std::atomic<int64_t> launches[kKernels] = {0, 0, 0, 0, 0};

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
// aligned), three per integer, and one more fact: for the forward whether the row count reaches
// the family's threshold (fwd_tiles's choice), for the gated kernels whether every row stride is
// N (their DENSE). At most 1 + 2 * 8 + 3 * 8 = 41 bits of facts, 3 of kernel, 20 of family.
uint64_t call_key(int64_t family, int64_t kernel, const uintptr_t *ptrs, const int64_t *ints, bool fact) {
    uint64_t bits = fact ? 1u : 0u, shift = 1;
    for (int i = 0; i < kShape[kernel][0]; ++i) {
        bits |= uint64_t((ptrs[i] != 0 ? 1u : 0u) | (ptrs[i] % 16 == 0 ? 2u : 0u)) << shift;
        shift += 2;
    }
    for (int i = 0; i < kShape[kernel][1]; ++i) {
        bits |= uint64_t(int_facts(ints[i])) << shift;
        shift += 3;
    }
    return (uint64_t(family) << 44) | (uint64_t(kernel) << 41) | bits;
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

// ceil(count / per_program) programs, at most the plan's cap: over ``count`` rows (columns for
// the sums, tiles for the gated backward)
int64_t programs_for(const Plan &plan, int64_t count) {
    const int64_t programs = (count + plan.per_program - 1) / plan.per_program;
    return plan.cap > 0 && programs > plan.cap ? plan.cap : programs;
}

// Launch ``programs`` programs of ``plan``, its parameters packed as Triton's launchers pack
// them: each kept argument, then the global and the profile scratch pointers.
void launch(const Plan &plan, int64_t kernel, const uintptr_t *ptrs, const int64_t *ints, const double *floats,
            int64_t programs, void *stream) {
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
    const int status = launch_fn.load()(plan.function, static_cast<unsigned>(programs), 1, 1, plan.block, 1, 1,
                                        plan.shared, stream, params, nullptr);
    TORCH_CHECK(status == 0, "hf_rmsnorm's CUDA norm: cuLaunchKernel failed with CUresult ", status,
                " (set HF_RMSNORM_CPP_LAUNCH=0 to launch from Python instead)");
    ++launches[kernel];
}

// A node's gradients of its three inputs, those it is asked for (the others undefined): from
// ``launch()`` (the C++ launches, all three; nullopt where they cannot serve), else from
// ``python(graph, needs)``, the Python backward (which registers its launches' plans), or with
// create_graph=True (``graph``: the kernels have no second derivative, the torch reference has)
// the reference's gradients as a graph; those return the wanted gradients in order, ``needs``
// having a bit per input.
template <class Launch, class Python>
variable_list node_gradients(const torch::autograd::Node &node, const variable_list &grads, Launch launch,
                             Python python) {
    variable_list out(3);
    if (!grads[0].defined()) return out;  // no gradient reached y
    const bool need[3] = {node.task_should_compute_output(0), node.task_should_compute_output(1),
                          node.task_should_compute_output(2)};
    const bool graph = at::GradMode::is_enabled();  // create_graph=True
    if (!graph) {
        if (const auto launched = launch()) {
            for (int k = 0; k < 3; ++k)
                if (need[k]) out[k] = (*launched)[k];
            return out;
        }
    }
    const std::vector<at::Tensor> wanted = python(graph, need[0] | (need[1] << 1) | (need[2] << 2));
    size_t i = 0;
    for (int k = 0; k < 3; ++k)
        if (need[k]) out[k] = wanted.at(i++);
    return out;
}

}  // namespace
