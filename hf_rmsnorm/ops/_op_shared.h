// Shared by the two C++ operators (_cpu_rms_norm_op.cpp, _cuda_launch_op.cpp), each built on
// its own with torch's headers; their build key hashes this file too (_cpu_kernel.build_library).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DispatchKeySet.h>
#include <torch/csrc/autograd/function.h>
#include <torch/library.h>

#include <cstdlib>
#include <initializer_list>
#include <memory>
#include <string_view>
#include <type_traits>

// The operators' namespace is a macro, HF_RMSNORM_NS, that each build defines (-D...). Up to torch
// 2.10 TORCH_LIBRARY stringised its namespace argument unexpanded (#ns; pytorch PR 174424 changed
// it): given HF_RMSNORM_NS itself, the schemas went to a namespace called "HF_RMSNORM_NS", the
// implementations (TORCH_LIBRARY_IMPL expands) to the build's, and Python found no operator
// there. One more macro between expands the name first, under every torch.
#define HF_STR2(s) #s
#define HF_STR(s) HF_STR2(s)
#define HF_RMSNORM_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define HF_RMSNORM_LIBRARY_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)

namespace {

// A new autograd node of type T, held the way this torch version holds nodes: an intrusive
// pointer, or a shared one before torch 2.12 or so (Edge::function tells which).
template <class T>
auto make_node() {
    if constexpr (std::is_same_v<decltype(torch::autograd::Edge::function), std::shared_ptr<torch::autograd::Node>>)
        return std::make_shared<T>();
    else
        return c10::make_intrusive<T>();
}

// Tensors whose calls others must see, or whose memory is not their values: a tensor subclass or
// a Python mode, functorch's wrappers (a finished torch.func transform leaves them behind),
// functionalization, and the lazy negation and conjugation bits (a negative view holds the values
// un-negated: read as memory it gives the wrong sign).
const c10::DispatchKeySet kNotPlain({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                     c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::FuncTorchBatched,
                                     c10::DispatchKey::Functionalize, c10::DispatchKey::Negative,
                                     c10::DispatchKey::Conjugate});

bool plain(const at::Tensor &t) { return t.layout() == at::kStrided && !t.key_set().has_any(kNotPlain); }

// Whether HF_RMSNORM_BACKEND, as _norm.selected_backend reads it, is one of ``values`` (unset
// reads as ""). Asked here so that a module's settled call need not ask it in Python (in a model's
// forward every Python check costs ~1 µs); any other value, however spelt, is the general path's
// to read, and to refuse where it names no backend. (os.environ's assignments reach getenv: they
// putenv.)
bool backend_is_one_of(std::initializer_list<std::string_view> values) {
    const char *set = std::getenv("HF_RMSNORM_BACKEND");
    const std::string_view value = set == nullptr ? "" : set;
    for (const auto v : values)
        if (value == v) return true;
    return false;
}

}  // namespace
