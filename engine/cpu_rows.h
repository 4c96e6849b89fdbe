// The activations every CPU matmul takes (cpu_matmul.cpp, cpu_fp32.cpp, cpu_vnni.cpp).
#pragma once

#include <cstdint>
#include <torch/extension.h>

namespace symphony {

// x as a matmul's rows: fp32 [M, K] on the CPU, made contiguous
inline torch::Tensor rows_of(torch::Tensor x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.size(1) == K &&
                  x.device().is_cpu(),
              "x must be fp32 [M, in] on the CPU");
  return x.contiguous();
}

}  // namespace symphony
