// Fused masked optimizer steps (lthfast/pruning/fused_optim.py): torch.optim.SGD and Adam / AdamW over many float32
// tensors in one call, each touching only the alive entries of its weight.
//
// Every element goes through the float32 operations of torch.optim's single-tensor (foreach=False) CPU step, in
// torch's order, with an FMA exactly where torch's vectorized ATen kernels use one (add with alpha, lerp, addcmul),
// so the results equal torch's bit for bit. Adam's square root is torch's too: where torch computes float32 sqrt with
// MKL's vmsSqrt (high-accuracy mode, not correctly rounded: 1 ulp off IEEE sqrt for ~20% of inputs), the kernels
// call the same function of the libtorch_cpu already loaded; the Python side picks the mode that reproduces
// torch.sqrt (optim_sqrt). A tensor is stepped in one of three modes:
//   sparse: at the flat offsets of its alive entries (int32 or int64), gathered into a small block, stepped by the
//           vector kernel, scattered back: O(alive) work;
//   masked: every entry, the gradient read as 0 where the mask byte is 0 (vectorized, for dense masks). Pruned
//           weights and their state are +0.0 (the caller zeroes them once per mask change) and a zero gradient
//           keeps them +0.0 through every formula below;
//   dense:  every entry (a parameter without a mask).
// The vector kernels are AVX2 + FMA, chosen at run time; the scalar twin runs the same operations.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#include "parallel.h"
#include "sparse_optim.h"

namespace py = pybind11;

namespace {

using namespace lthfast::optim;

// Mode of a tensor (low bits of its kind code); bit 2 flags SGD's fresh momentum buffer or Adam's float64 step.
enum Mode : int { DENSE = 0, MASKED = 1, SPARSE32 = 2, SPARSE64 = 3 };
constexpr int kModeBits = 3;
constexpr int kFlag = 4;
constexpr int64_t kItem = 1 << 14;         // work units (entries) per parallel item, a multiple of kBlock
constexpr int64_t kParallelMin = 1 << 16;  // less work than this runs on the calling thread

// ---------------------------------------------------------------------------------------------------------------
// The call: tensors, their modes, and the items the work is split into.

struct Tensor {
  float* buf[5];  // SGD: param, grad, momentum buffer; Adam: param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq
  const void* index;  // flat offsets (sparse), mask bytes (masked) or null (dense)
  int mode;
  int64_t count;  // alive entries (sparse) or elements
};

struct Item {
  int64_t tensor, begin, end;
};

// Reads the per-tensor lists; `width` addresses per tensor in `ptrs`, the first two (param, grad) non-null.
std::vector<Tensor> read_tensors(const char* what, const std::vector<uintptr_t>& ptrs, size_t width,
                                 const std::vector<uintptr_t>& index, const std::vector<int>& kinds,
                                 const std::vector<int64_t>& counts) {
  const size_t n = kinds.size();
  if (ptrs.size() != width * n || index.size() != n || counts.size() != n)
    throw std::invalid_argument(std::string("lthfast._C.") + what + ": per-tensor lists differ in length");
  std::vector<Tensor> out(n);
  for (size_t t = 0; t < n; ++t) {
    Tensor& x = out[t];
    for (size_t j = 0; j < 5; ++j) x.buf[j] = j < width ? reinterpret_cast<float*>(ptrs[width * t + j]) : nullptr;
    x.index = reinterpret_cast<const void*>(index[t]);
    x.mode = kinds[t] & kModeBits;
    x.count = counts[t];
    if (x.count < 0 || (x.count > 0 && (!x.buf[0] || !x.buf[1] || (x.mode != DENSE && !x.index))))
      throw std::invalid_argument(std::string("lthfast._C.") + what + ": bad count or null buffer");
  }
  return out;
}

std::vector<Item> split(const std::vector<Tensor>& tensors, int64_t* total) {
  std::vector<Item> items;
  *total = 0;
  for (size_t t = 0; t < tensors.size(); ++t) {
    for (int64_t b = 0; b < tensors[t].count; b += kItem)
      items.push_back({static_cast<int64_t>(t), b, std::min(b + kItem, tensors[t].count)});
    *total += tensors[t].count;
  }
  return items;
}

template <class F>
void run_items(const std::vector<Item>& items, int64_t total, int threads, F&& fn) {
  const int nt = total < kParallelMin ? 1 : std::max(1, threads);
  py::gil_scoped_release release;
  lthfast::parallel_for(static_cast<int64_t>(items.size()), nt, [&](int64_t i) { fn(items[i]); });
}

template <class Off>
void gather(float* dst, const float* src, const Off* off, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = src[off[j]];
}

template <class Off>
void scatter(float* dst, const float* src, const Off* off, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[off[j]] = src[j];
}

// Entries [begin, end) of a sparse tensor: gathered `kBlock` at a time into `nbuf` local arrays, `step(locals, n)`
// on them, the first `written` of them (the updated ones: not the gradient, local 1) scattered back.
template <class Off, class F>
void sparse_blocks(const Tensor& x, int nbuf, int64_t begin, int64_t end, F&& step) {
  alignas(32) float local[5][kBlock];
  float* locals[5];
  const Off* off = static_cast<const Off*>(x.index);
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t n = std::min(kBlock, end - b);
    for (int j = 0; j < nbuf; ++j) {
      locals[j] = x.buf[j] ? local[j] : nullptr;
      if (x.buf[j]) gather(local[j], x.buf[j], off + b, n);
    }
    step(locals, n);
    for (int j = 0; j < nbuf; ++j)
      if (x.buf[j] && j != 1) scatter(x.buf[j], local[j], off + b, n);
  }
}

template <class F>
void step_item(const Tensor& x, int nbuf, const Item& it, F&& step) {
  const int64_t n = it.end - it.begin;
  if (x.mode == SPARSE32) return sparse_blocks<int32_t>(x, nbuf, it.begin, it.end, [&](float** l, int64_t k) {
    step(l, nullptr, k);
  });
  if (x.mode == SPARSE64) return sparse_blocks<int64_t>(x, nbuf, it.begin, it.end, [&](float** l, int64_t k) {
    step(l, nullptr, k);
  });
  float* at[5];
  for (int j = 0; j < 5; ++j) at[j] = x.buf[j] ? x.buf[j] + it.begin : nullptr;
  const uint8_t* mask = x.mode == MASKED ? static_cast<const uint8_t*>(x.index) + it.begin : nullptr;
  step(at, mask, n);
}

void check_groups(const char* what, const std::vector<int>& groups, size_t n, size_t hyper, size_t width) {
  if (groups.size() != n || hyper % width)
    throw std::invalid_argument(std::string("lthfast._C.") + what + ": groups or hyper-parameters malformed");
  for (int g : groups)
    if (g < 0 || static_cast<size_t>(g) * width >= hyper)
      throw std::invalid_argument(std::string("lthfast._C.") + what + ": group index out of range");
}

void sgd_step_py(const std::vector<uintptr_t>& ptrs, const std::vector<uintptr_t>& index, const std::vector<int>& kinds,
                 const std::vector<int64_t>& counts, const std::vector<int>& groups, const std::vector<double>& hyper,
                 int threads) {
  constexpr size_t kHyper = 6;  // lr, momentum, dampening, weight_decay, nesterov, maximize
  std::vector<Tensor> tensors = read_tensors("sgd_step", ptrs, 3, index, kinds, counts);
  check_groups("sgd_step", groups, tensors.size(), hyper.size(), kHyper);
  std::vector<SgdScalars> scalars(tensors.size());
  for (size_t t = 0; t < tensors.size(); ++t) {
    const double* h = &hyper[kHyper * groups[t]];
    SgdScalars& s = scalars[t];
    s.neg_lr = static_cast<float>(-h[0]);
    s.momentum = static_cast<float>(h[1]);
    s.damp1 = static_cast<float>(1.0 - h[2]);
    s.wd = static_cast<float>(h[3]);
    s.has_momentum = h[1] != 0.0;
    s.has_wd = h[3] != 0.0;
    s.nesterov = h[4] != 0.0;
    s.maximize = h[5] != 0.0;
    s.first = (kinds[t] & kFlag) != 0;
    if (s.has_momentum && tensors[t].count > 0 && !tensors[t].buf[2])
      throw std::invalid_argument("lthfast._C.sgd_step: momentum without a buffer");
    if (!s.has_momentum) tensors[t].buf[2] = nullptr;
  }
  int64_t total;
  const std::vector<Item> items = split(tensors, &total);
  run_items(items, total, threads, [&](const Item& it) {
    const SgdScalars& s = scalars[it.tensor];
    step_item(tensors[it.tensor], 3, it, [&](float** b, const uint8_t* mask, int64_t n) {
      sgd_block(s, b[0], b[1], b[2], mask, n);
    });
  });
}

// torch's bias corrections, in double as its Python code computes them, from the incremented step.
AdamScalars adam_scalars(const double* h, double step) {
  const double lr = h[0], beta1 = h[1], beta2 = h[2], eps = h[3], wd = h[4];
  AdamScalars s;
  s.maximize = h[6] != 0.0;
  s.amsgrad = h[5] != 0.0;
  s.wd_mode = wd == 0.0 ? 0 : h[7] != 0.0 ? 2 : 1;
  s.wd = static_cast<float>(wd);
  s.decay = static_cast<float>(1.0 - lr * wd);
  const float w = static_cast<float>(1.0 - beta1);
  s.lerp_small = std::fabs(w) < 0.5f;
  s.lerp_coeff = s.lerp_small ? w : w - 1.0f;
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  const double bias_correction1 = 1.0 - std::pow(beta1, step);
  const double bias_correction2 = 1.0 - std::pow(beta2, step);
  s.neg_step = static_cast<float>(-(lr / bias_correction1));
  s.bc2_sqrt = static_cast<float>(std::pow(bias_correction2, 0.5));  // Python's bias_correction2 ** 0.5
  s.eps = static_cast<float>(eps);
  return s;
}

void adam_step_py(const std::vector<uintptr_t>& ptrs, const std::vector<uintptr_t>& steps,
                  const std::vector<uintptr_t>& index, const std::vector<int>& kinds,
                  const std::vector<int64_t>& counts, const std::vector<int>& groups, const std::vector<double>& hyper,
                  int threads) {
  constexpr size_t kHyper = 8;  // lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled
  std::vector<Tensor> tensors = read_tensors("adam_step", ptrs, 5, index, kinds, counts);
  check_groups("adam_step", groups, tensors.size(), hyper.size(), kHyper);
  if (steps.size() != tensors.size()) throw std::invalid_argument("lthfast._C.adam_step: one step per tensor");
  for (size_t t = 0; t < tensors.size(); ++t) {
    Tensor& x = tensors[t];
    const bool amsgrad = hyper[kHyper * groups[t] + 5] != 0.0;
    if (!steps[t] || (x.count > 0 && (!x.buf[2] || !x.buf[3] || (amsgrad && !x.buf[4]))))
      throw std::invalid_argument("lthfast._C.adam_step: null state buffer");
    if (!amsgrad) x.buf[4] = nullptr;
  }
  // state["step"] += 1 (a float32 tensor, float64 under a float64 default dtype), then the bias corrections
  std::vector<AdamScalars> scalars(tensors.size());
  for (size_t t = 0; t < tensors.size(); ++t) {
    double step;
    if (kinds[t] & kFlag) {
      double* st = reinterpret_cast<double*>(steps[t]);
      step = *st += 1.0;
    } else {
      float* st = reinterpret_cast<float*>(steps[t]);
      step = *st += 1.0f;
    }
    scalars[t] = adam_scalars(&hyper[kHyper * groups[t]], step);
  }
  int64_t total;
  const std::vector<Item> items = split(tensors, &total);
  run_items(items, total, threads, [&](const Item& it) {
    const AdamScalars& s = scalars[it.tensor];
    step_item(tensors[it.tensor], 5, it, [&](float** b, const uint8_t* mask, int64_t n) {
      adam_block(s, b[0], b[1], b[2], b[3], b[4], mask, n);
    });
  });
}

// Whether every entry of g whose mask byte is 0 is +-0 (the bits but the sign are 0), for one chunk.
template <class U>
bool pruned_zero(const U* g, const uint8_t* mask, int64_t n) {
  constexpr U kMagnitude = static_cast<U>(~(U{1} << (8 * sizeof(U) - 1)));
  U acc = 0;  // branch-free, so that the compiler vectorizes it
  for (int64_t i = 0; i < n; ++i) acc |= g[i] & kMagnitude & static_cast<U>(static_cast<U>(mask[i]) - U{1});
  return acc == 0;
}

std::vector<bool> pruned_grads_zero_py(const std::vector<uintptr_t>& grads, const std::vector<uintptr_t>& masks,
                                       const std::vector<int64_t>& numels, const std::vector<int>& esizes,
                                       int threads) {
  const size_t n = grads.size();
  if (masks.size() != n || numels.size() != n || esizes.size() != n)
    throw std::invalid_argument("lthfast._C.pruned_grads_zero: per-tensor lists differ in length");
  std::vector<Item> items;
  int64_t total = 0;
  for (size_t t = 0; t < n; ++t) {
    if (esizes[t] != 2 && esizes[t] != 4 && esizes[t] != 8)
      throw std::invalid_argument("lthfast._C.pruned_grads_zero: element size must be 2, 4 or 8");
    if (numels[t] < 0 || (numels[t] > 0 && (!grads[t] || !masks[t])))
      throw std::invalid_argument("lthfast._C.pruned_grads_zero: bad count or null buffer");
    for (int64_t b = 0; b < numels[t]; b += 4 * kItem)
      items.push_back({static_cast<int64_t>(t), b, std::min(b + 4 * kItem, numels[t])});
    total += numels[t];
  }
  std::vector<std::atomic<bool>> bad(n);
  for (auto& b : bad) b.store(false);
  run_items(items, total, threads, [&](const Item& it) {
    const size_t t = static_cast<size_t>(it.tensor);
    if (bad[t].load(std::memory_order_relaxed)) return;
    const uint8_t* mask = reinterpret_cast<const uint8_t*>(masks[t]) + it.begin;
    const int64_t k = it.end - it.begin;
    bool ok;
    if (esizes[t] == 4 && use_vector()) {
      ok = pruned_zero32_avx2(reinterpret_cast<const uint32_t*>(grads[t]) + it.begin, mask, k);
    } else if (esizes[t] == 4) {
      ok = pruned_zero(reinterpret_cast<const uint32_t*>(grads[t]) + it.begin, mask, k);
    } else if (esizes[t] == 2) {
      ok = pruned_zero(reinterpret_cast<const uint16_t*>(grads[t]) + it.begin, mask, k);
    } else {
      ok = pruned_zero(reinterpret_cast<const uint64_t*>(grads[t]) + it.begin, mask, k);
    }
    if (!ok) bad[t].store(true, std::memory_order_relaxed);
  });
  std::vector<bool> out(n);
  for (size_t t = 0; t < n; ++t) out[t] = !bad[t].load();
  return out;
}

bool optim_vector_kernels_py(bool enabled) { return g_vector.exchange(enabled); }

void optim_sqrt_py(int mode, uintptr_t src, uintptr_t dst, int64_t n) {
  if (mode != 0 && mode != 1) throw std::invalid_argument("lthfast._C.optim_sqrt: mode is 0 (IEEE) or 1 (MKL)");
  if (mode == 1 && !vml_sqrt_fn()) throw std::runtime_error("lthfast._C.optim_sqrt: no MKL vmsSqrt in this process");
  if (n < 0 || (n > 0 && (!src || !dst))) throw std::invalid_argument("lthfast._C.optim_sqrt: bad buffer");
  g_vml_sqrt.store(mode == 1);
  const float* x = reinterpret_cast<const float*>(src);
  float* out = reinterpret_cast<float*>(dst);
  for (int64_t b = 0; b < n; b += kBlock) sqrt_block(x + b, out + b, std::min(kBlock, n - b));
}

}  // namespace

void bind_sparse_optim(py::module_& m) {
  m.def("sgd_step", &sgd_step_py, py::arg("ptrs"), py::arg("index"), py::arg("kinds"), py::arg("counts"),
        py::arg("groups"), py::arg("hyper"), py::arg("threads"),
        "torch.optim.SGD's float32 step over many tensors in place. ptrs: 3 addresses per tensor (param, grad, "
        "momentum buffer or 0); index: flat alive offsets (kinds & 3 = 2: int32, 3: int64), mask bytes (1) or 0 "
        "(0: dense); kinds & 4: the momentum buffer is new (set to the gradient); counts: alive entries or "
        "elements; groups: each tensor's group; hyper: 6 per group (lr, momentum, dampening, weight_decay, "
        "nesterov, maximize).");
  m.def("adam_step", &adam_step_py, py::arg("ptrs"), py::arg("steps"), py::arg("index"), py::arg("kinds"),
        py::arg("counts"), py::arg("groups"), py::arg("hyper"), py::arg("threads"),
        "torch.optim.Adam / AdamW's float32 step over many tensors in place. ptrs: 5 addresses per tensor (param, "
        "grad, exp_avg, exp_avg_sq, max_exp_avg_sq or 0); steps: the address of each state['step'] (incremented "
        "here; kinds & 4: float64, else float32); index, kinds & 3, counts, groups as sgd_step; hyper: 8 per group "
        "(lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled).");
  m.def("optim_sqrt", &optim_sqrt_py, py::arg("mode"), py::arg("src"), py::arg("dst"), py::arg("n"),
        "Set the square root of adam_step (0: IEEE sqrt; 1: MKL's vmsSqrt in high-accuracy mode, as ATen calls it, "
        "from the libtorch_cpu loaded; RuntimeError where there is none) and write the sqrt of n float32 at src to "
        "dst under it, so the caller can check it reproduces torch.sqrt. Process-wide.");
  m.def("pruned_grads_zero", &pruned_grads_zero_py, py::arg("grads"), py::arg("masks"), py::arg("numels"),
        py::arg("esizes"), py::arg("threads"),
        "For each contiguous floating-point buffer (address, its bool mask's address, element count, element size 2, "
        "4 or 8): whether it is +-0 wherever the mask is 0. Read-only.");
  m.def("optim_vector_kernels", &optim_vector_kernels_py, py::arg("enabled"),
        "Use the AVX2 optimizer kernels where the CPU has them (True, the default) or the scalar ones (False, for "
        "tests). Returns the previous setting. Process-wide.");
}
