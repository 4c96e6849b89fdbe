// The decoder layers of a CPU step in one call: what engine/model.py's
// DecoderLayer.forward does, op for op (the same kernels, in the same order, so the
// same bits), without Python between the ops.
//
// At batch 1 the layers' Python (module calls, attribute lookups, a tensor per op) cost
// about 3 ms of a 12 ms int8 step on the 2-core Zen 4: 30 layers of a dozen calls each.
// engine/model.py takes this path for steps whose every row goes to the attention
// kernel in order (decodes, unmasked chunks) and whose linears all have a compiled
// kernel for that many rows (fp32 up to 16, int8 on AVX2 up to 64, on VNNI any).

#include <optional>
#include <string>
#include <vector>
#include <pybind11/stl.h>
#include <torch/extension.h>

namespace py = pybind11;

// cpu_kernels.cpp, cpu_matmul.cpp, cpu_fp32.cpp, cpu_vnni.cpp
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
torch::Tensor silu_mul(torch::Tensor gate_up);
torch::Tensor rope_store_kv(torch::Tensor qkv, int64_t num_heads, int64_t num_kv_heads,
                            torch::Tensor cos, torch::Tensor sin, torch::Tensor slots,
                            torch::Tensor k_cache, torch::Tensor v_cache);
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                              torch::Tensor block_tables, torch::Tensor row_starts,
                              torch::Tensor lens, double scale);
torch::Tensor fp32_mm(torch::Tensor x, torch::Tensor w);
torch::Tensor group_int8_mm(torch::Tensor x, torch::Tensor q, torch::Tensor scales,
                            torch::Tensor zeros, int64_t n);
torch::Tensor group_int8_vnni_mm(torch::Tensor x, torch::Tensor q, torch::Tensor scales,
                                 torch::Tensor zeros, int64_t n);

namespace {

// One linear layer as its kernel takes it: "fp32" (weight), "int8" (the AVX2 kernel's
// q, scales, zeros) or "int8-vnni" (the VNNI kernel's), and an optional bias
struct KernelLinear {
  std::string kind;
  std::vector<torch::Tensor> tensors;
  int64_t out_features;
  std::optional<torch::Tensor> bias;

  torch::Tensor operator()(const torch::Tensor& x) const {
    torch::Tensor y;
    if (kind == "fp32")
      y = fp32_mm(x, tensors[0]);
    else if (kind == "int8")
      y = group_int8_mm(x, tensors[0], tensors[1], tensors[2], out_features);
    else
      y = group_int8_vnni_mm(x, tensors[0], tensors[1], tensors[2], out_features);
    return bias ? y + *bias : y;
  }
};

KernelLinear make_linear(const std::string& kind, std::vector<torch::Tensor> tensors,
                         int64_t out_features, std::optional<torch::Tensor> bias) {
  const size_t want = kind == "fp32" ? 1 : 3;
  TORCH_CHECK(kind == "fp32" || kind == "int8" || kind == "int8-vnni",
              "a linear's kind is fp32, int8 or int8-vnni");
  TORCH_CHECK(tensors.size() == want, "a ", kind, " linear takes ", want, " tensors");
  return {kind, std::move(tensors), out_features, std::move(bias)};
}

struct Layer {
  torch::Tensor attn_norm, ffn_norm;
  KernelLinear qkv, o, gate_up, down;
};

class Decoder {
 public:
  Decoder(std::vector<Layer> layers, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
          double eps, double scale)
      : layers_(std::move(layers)), nh_(num_heads), nkv_(num_kv_heads), d_(head_dim), eps_(eps),
        scale_(scale) {}

  // h [T, hidden] through every layer; the attention kernel's plan (tables, row starts,
  // lens) covers every row of the step in order
  torch::Tensor run(torch::Tensor h, const torch::Tensor& cos, const torch::Tensor& sin,
                    const torch::Tensor& slots, const std::vector<torch::Tensor>& k_caches,
                    const std::vector<torch::Tensor>& v_caches, const torch::Tensor& tables,
                    const torch::Tensor& starts, const torch::Tensor& lens) const {
    TORCH_CHECK(k_caches.size() == layers_.size() && v_caches.size() == layers_.size(),
                "one K and one V cache a layer");
    const int64_t t = h.size(0);
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& l = layers_[i];
      const torch::Tensor qkv = l.qkv(rms_norm(h, l.attn_norm, eps_));
      const torch::Tensor q =
          rope_store_kv(qkv, nh_, nkv_, cos, sin, slots, k_caches[i], v_caches[i]);
      const torch::Tensor attn =
          paged_attention(q, k_caches[i], v_caches[i], tables, starts, lens, scale_);
      h = h + l.o(attn.view({t, nh_ * d_}));
      h = h + l.down(silu_mul(l.gate_up(rms_norm(h, l.ffn_norm, eps_))));
    }
    return h;
  }

 private:
  std::vector<Layer> layers_;
  int64_t nh_, nkv_, d_;
  double eps_, scale_;  // the norms' epsilon; the attention's 1 / sqrt(head_dim)
};

}  // namespace

void bind_decoder(py::module& m) {
  py::class_<KernelLinear>(m, "KernelLinear");
  m.def("kernel_linear", &make_linear, "a linear layer as its compiled kernel takes it");
  py::class_<Layer>(m, "DecoderLayerWeights")
      .def(py::init<torch::Tensor, torch::Tensor, KernelLinear, KernelLinear, KernelLinear,
                    KernelLinear>());
  py::class_<Decoder>(m, "Decoder")
      .def(py::init<std::vector<Layer>, int64_t, int64_t, int64_t, double, double>())
      .def("run", &Decoder::run, py::call_guard<py::gil_scoped_release>(),
           "h through every layer, attention by the kernel's plan");
}
