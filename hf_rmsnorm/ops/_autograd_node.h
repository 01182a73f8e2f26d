// Shared by the two C++ operators (_cpu_rms_norm_op.cpp, _cuda_launch_op.cpp), each built on
// its own with torch's headers; their build key hashes this file too (_cpu_kernel.build_library).
#pragma once

#include <torch/csrc/autograd/function.h>

#include <memory>
#include <type_traits>

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

}  // namespace
