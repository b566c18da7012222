// pybind11 bindings for lthfast._C. Tensors arrive as plain buffers (address, element count, dtype code):
// the extension does not link libtorch. lthfast/threshold.py validates shapes, devices, dtypes and
// contiguity before calling in, and keeps the tensors alive during the call.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include "block_matmul.h"
#include "mask_update.h"
#include "parallel.h"
#include "threshold.h"
#include "tile_index.h"

namespace py = pybind11;

// Bindings of the unstructured sparse kernels (sparse_matmul.cpp) and the fused masked optimizers
// (sparse_optim.cpp), defined beside them.
void bind_sparse_matmul(py::module_& m);
void bind_sparse_optim(py::module_& m);

namespace {

// Whether the byte ranges of any two buffers (weights and masks) of `tensors` overlap.
bool any_overlap(const std::vector<lthfast::TensorRef>& tensors) {
  std::vector<std::pair<uintptr_t, uintptr_t>> spans;
  spans.reserve(2 * tensors.size());
  for (const lthfast::TensorRef& t : tensors) {
    if (t.numel == 0) continue;
    const auto data = reinterpret_cast<uintptr_t>(t.data);
    spans.emplace_back(data, data + static_cast<uintptr_t>(t.numel) * lthfast::element_size(t.dtype));
    if (t.mask != nullptr) {
      const auto mask = reinterpret_cast<uintptr_t>(t.mask);
      spans.emplace_back(mask, mask + static_cast<uintptr_t>(t.numel));
    }
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i)
    if (spans[i].first < spans[i - 1].second) return true;
  return false;
}

py::dict select_py(const std::vector<uintptr_t>& data, const std::vector<uintptr_t>& masks,
                const std::vector<int64_t>& numels, const std::vector<int>& dtypes, const std::vector<float>& scales,
                const std::vector<std::vector<int>>& groups, const std::vector<double>& amounts,
                const std::vector<int64_t>& ks, bool write, int threads, int64_t grain,
                bool zero_weights, bool speculate) {
  const size_t n = data.size();
  if (masks.size() != n || numels.size() != n || dtypes.size() != n || (!scales.empty() && scales.size() != n))
    throw std::invalid_argument("lthfast._C.select: per-tensor lists differ in length");
  if ((amounts.empty() == ks.empty()) || (amounts.empty() ? ks.size() : amounts.size()) != groups.size())
    throw std::invalid_argument("lthfast._C.select: give one amount or one k per group");
  lthfast::Request req;
  req.tensors.resize(n);
  for (size_t i = 0; i < n; ++i) {
    lthfast::TensorRef& t = req.tensors[i];
    t.data = reinterpret_cast<const void*>(data[i]);
    t.mask = reinterpret_cast<uint8_t*>(masks[i]);
    t.numel = numels[i];
    t.dtype = dtypes[i];
    if (t.dtype < lthfast::F32 || t.dtype > lthfast::BF16) throw std::invalid_argument("lthfast._C.select: dtype code");
    if (write && t.mask == nullptr && t.numel > 0) throw std::invalid_argument("lthfast._C.select: write needs every mask");
    if (zero_weights && !write) throw std::invalid_argument("lthfast._C.select: zero_weights needs write");
    t.zero = zero_weights ? reinterpret_cast<void*>(data[i]) : nullptr;
    t.scaled = !scales.empty();
    t.scale = t.scaled ? scales[i] : 1.0f;
  }
  for (const auto& g : groups)
    for (int t : g)
      if (t < 0 || static_cast<size_t>(t) >= n) throw std::invalid_argument("lthfast._C.select: group index");
  req.groups = groups;
  req.amounts = amounts;
  req.ks = ks;
  req.write = write;
  // Speculative pruning writes a weight before the pass has read the rest: only where no two buffers share
  // memory (a weight passed twice would be read after its own speculative write).
  req.speculate = speculate && zero_weights && !any_overlap(req.tensors);
  req.threads = threads < 1 ? 1 : threads;
  req.grain = grain < 1 ? 1 : grain;
  lthfast::Result res;
  {
    py::gil_scoped_release release;
    res = lthfast::select_threshold(req);
  }
  std::vector<double> thresholds;
  for (size_t g = 0; g < groups.size(); ++g) {
    float f;
    std::memcpy(&f, &res.threshold[g], 4);
    thresholds.push_back(res.k[g] > 0 ? double{f} : -std::numeric_limits<double>::infinity());
  }
  py::dict out;
  out["status"] = res.status;
  out["bad_tensors"] = res.bad_tensors;
  out["alive"] = res.alive;
  out["k"] = res.k;
  out["threshold"] = thresholds;
  out["pruned"] = res.pruned;
  out["passes"] = res.passes;
  out["collected"] = res.collected;
  out["speculated"] = res.speculated;
  out["ms"] = py::dict(py::arg("sample") = res.sample_ms, py::arg("count") = res.count_ms,
                       py::arg("apply") = res.apply_ms);
  return out;
}

int64_t write_masks_py(const std::vector<uintptr_t>& weights, const std::vector<int>& esizes,
                       const std::vector<uintptr_t>& buffers, const std::vector<uintptr_t>& masks,
                       const std::vector<int64_t>& numels, int threads, int64_t grain) {
  const size_t n = weights.size();
  if (esizes.size() != n || buffers.size() != n || masks.size() != n || numels.size() != n)
    throw std::invalid_argument("lthfast._C.write_masks: per-tensor lists differ in length");
  std::vector<lthfast::MaskWrite> items(n);
  for (size_t i = 0; i < n; ++i) {
    if (esizes[i] != 2 && esizes[i] != 4 && esizes[i] != 8)
      throw std::invalid_argument("lthfast._C.write_masks: element size must be 2, 4 or 8");
    items[i] = lthfast::MaskWrite{reinterpret_cast<uint8_t*>(weights[i]), esizes[i],
                                  reinterpret_cast<uint8_t*>(buffers[i]),
                                  reinterpret_cast<const uint8_t*>(masks[i]), numels[i]};
  }
  py::gil_scoped_release release;
  return lthfast::write_masks(items, threads < 1 ? 1 : threads, grain < 1 ? 1 : grain);
}

template <class T>
py::array_t<T> to_numpy(const std::vector<T>& v) {
  return py::array_t<T>(static_cast<py::ssize_t>(v.size()), v.data());
}


std::vector<bool> any_nonzero_py(const std::vector<uintptr_t>& buffers, const std::vector<int64_t>& nbytes) {
  if (buffers.size() != nbytes.size()) throw std::invalid_argument("lthfast._C.any_nonzero: lists differ in length");
  std::vector<bool> out(buffers.size());
  py::gil_scoped_release release;
  for (size_t i = 0; i < buffers.size(); ++i) {
    // a live mask nearly always has a nonzero byte among its first few: the scan stops there
    const auto* p = reinterpret_cast<const uint8_t*>(buffers[i]);
    int64_t j = 0;
    bool any = false;
    for (; !any && j + 64 <= nbytes[i]; j += 64) {
      uint64_t acc = 0;
      for (int q = 0; q < 8; ++q) {
        uint64_t w;
        std::memcpy(&w, p + j + 8 * q, 8);
        acc |= w;
      }
      any = acc != 0;
    }
    for (; !any && j < nbytes[i]; ++j) any = p[j] != 0;
    out[i] = any;
  }
  return out;
}

py::tuple tile_index_tuple(lthfast::TileIndexArrays& a) {
  // bool: torch.from_numpy gives the torch.bool tile map without a view
  py::array_t<bool> alive({static_cast<py::ssize_t>(a.tiles_n), static_cast<py::ssize_t>(a.tiles_k)});
  if (!a.alive.empty()) std::memcpy(alive.mutable_data(), a.alive.data(), a.alive.size());
  return py::make_tuple(alive, to_numpy(a.row_ptr), to_numpy(a.tile_cols), to_numpy(a.col_ptr), to_numpy(a.col_rows),
                        to_numpy(a.tile_rows), a.max_row_tiles, a.max_col_tiles);
}

void check_tile_job(int64_t n, int64_t k, int64_t row_stride, int64_t block_n, int64_t block_k) {
  if (n < 0 || k < 0 || block_n < 1 || block_k < 1 || (n > 0 && k > 0 && row_stride < k))
    throw std::invalid_argument("lthfast._C.tile_index: bad shape, stride or block");
}

py::tuple tile_index_py(uintptr_t mask, int64_t n, int64_t k, int64_t row_stride, int64_t block_n, int64_t block_k) {
  check_tile_job(n, k, row_stride, block_n, block_k);
  lthfast::TileIndexArrays a;
  {
    py::gil_scoped_release release;
    a = lthfast::build_tile_index(reinterpret_cast<const uint8_t*>(mask), n, k, row_stride, block_n, block_k);
  }
  return tile_index_tuple(a);
}

py::list tile_indices_py(const std::vector<uintptr_t>& masks, const std::vector<int64_t>& ns,
                         const std::vector<int64_t>& ks, const std::vector<int64_t>& row_strides, int64_t block_n,
                         int64_t block_k, int threads, const std::vector<uintptr_t>& previous) {
  const size_t m = masks.size();
  if (ns.size() != m || ks.size() != m || row_strides.size() != m || (!previous.empty() && previous.size() != m))
    throw std::invalid_argument("lthfast._C.tile_indices: per-mask lists differ in length");
  for (size_t i = 0; i < m; ++i) check_tile_job(ns[i], ks[i], row_strides[i], block_n, block_k);
  std::vector<lthfast::TileIndexArrays> out(m);
  {
    py::gil_scoped_release release;
    // largest masks first: a thread that takes the last small one does not hold the others up
    std::vector<size_t> order(m);
    for (size_t i = 0; i < m; ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return ns[a] * ks[a] > ns[b] * ks[b]; });
    lthfast::parallel_for(static_cast<int64_t>(m), threads < 1 ? 1 : threads, [&](int64_t j) {
      const size_t i = order[j];
      out[i] = lthfast::build_tile_index(reinterpret_cast<const uint8_t*>(masks[i]), ns[i], ks[i], row_strides[i],
                                         block_n, block_k,
                                         previous.empty() ? nullptr : reinterpret_cast<const uint8_t*>(previous[i]));
    });
  }
  py::list result;
  for (auto& a : out) {
    if (a.same) {
      result.append(py::none());
    } else {
      result.append(tile_index_tuple(a));
    }
  }
  return result;
}

void block_rows_product_py(int64_t block, uintptr_t a, int64_t lda, uintptr_t tiles, uintptr_t starts, uintptr_t a_cols,
                           int64_t groups, uintptr_t bias, uintptr_t c, int64_t ldc, int64_t m, int threads) {
  if (block < 16 || block % 16 || m < 0 || groups < 0 || ldc < block * groups ||
      (m > 0 && groups > 0 && (!a || !c || !starts)))
    throw std::invalid_argument("lthfast._C.block_rows_product: bad sizes or null buffer");
  if (!lthfast::block_kernels_supported()) throw std::runtime_error("lthfast._C.block_rows_product: needs AVX2+FMA");
  lthfast::RowsProduct p;
  p.block = block;
  p.a = reinterpret_cast<const float*>(a);
  p.lda = lda;
  p.tiles = reinterpret_cast<const float*>(tiles);
  p.starts = reinterpret_cast<const int64_t*>(starts);
  p.a_cols = reinterpret_cast<const int64_t*>(a_cols);
  p.groups = groups;
  p.bias = reinterpret_cast<const float*>(bias);
  p.c = reinterpret_cast<float*>(c);
  p.ldc = ldc;
  p.m = m;
  py::gil_scoped_release release;
  lthfast::block_rows_product(p, threads < 1 ? 1 : threads);
}

void block_grad_weight_py(int64_t block, uintptr_t dy, int64_t ldy, uintptr_t x, int64_t ldx, int64_t m, uintptr_t tile_rows,
                          uintptr_t tile_cols, int64_t nnz, uintptr_t keep, int64_t n, int64_t k, uintptr_t dw,
                          int threads) {
  if (block < 16 || block % 16 || m < 0 || nnz < 0 || n < 0 || k < 0 ||
      (m > 0 && nnz > 0 && (!dy || !x || !tile_rows || !tile_cols || !keep || !dw)))
    throw std::invalid_argument("lthfast._C.block_grad_weight: bad sizes or null buffer");
  if (!lthfast::block_kernels_supported()) throw std::runtime_error("lthfast._C.block_grad_weight: needs AVX2+FMA");
  lthfast::GradWeight p;
  p.block = block;
  p.dy = reinterpret_cast<const float*>(dy);
  p.ldy = ldy;
  p.x = reinterpret_cast<const float*>(x);
  p.ldx = ldx;
  p.m = m;
  p.tile_rows = reinterpret_cast<const int64_t*>(tile_rows);
  p.tile_cols = reinterpret_cast<const int64_t*>(tile_cols);
  p.nnz = nnz;
  p.keep = reinterpret_cast<const uint8_t*>(keep);
  p.n = n;
  p.k = k;
  p.dw = reinterpret_cast<float*>(dw);
  py::gil_scoped_release release;
  lthfast::block_grad_weight(p, threads < 1 ? 1 : threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lthfast C++ extension: global magnitude threshold by radix select";
  m.attr("ABI_VERSION") = 3;
  m.attr("STATUS_OK") = static_cast<int>(lthfast::OK);
  m.attr("STATUS_NONFINITE") = static_cast<int>(lthfast::NONFINITE);
  m.attr("STATUS_K_TOO_LARGE") = static_cast<int>(lthfast::K_TOO_LARGE);
  m.def("select", &select_py, py::arg("data"), py::arg("masks"), py::arg("numels"), py::arg("dtypes"),
        py::arg("scales"), py::arg("groups"), py::arg("amounts"), py::arg("ks"), py::arg("write"),
        py::arg("threads"), py::arg("grain"), py::arg("zero_weights") = false, py::arg("speculate") = false,
        "Threshold select over plain buffers (dtype codes: 0 float32, 1 float16, 2 bfloat16; mask address 0 = "
        "all alive; zero_weights: also write +0.0 into the weights it prunes; speculate, with zero_weights: the "
        "masks are bool, so the first pass may prune below its bracket in place, undone on failure, where no two "
        "buffers overlap). Returns a dict: status, bad_tensors, alive, k, threshold, pruned, passes, "
        "collected, speculated (per group: elements the first pass pruned in place, kept or undone), ms.");
  m.def("write_masks", &write_masks_py, py::arg("weights"), py::arg("esizes"), py::arg("buffers"),
        py::arg("masks"), py::arg("numels"), py::arg("threads"), py::arg("grain"),
        "Copy each mask (bytes) into its buffer and zero the weights (2, 4 or 8-byte elements, all bits) where "
        "it is 0, over plain contiguous buffers. Returns the number of weights changed.");
  m.def("tile_index", &tile_index_py, py::arg("mask"), py::arg("n"), py::arg("k"), py::arg("row_stride"),
        py::arg("block_n"), py::arg("block_k"),
        "Tile index of an [n, k] byte mask (rows row_stride bytes apart): numpy arrays (alive [Tn, Tk] uint8, "
        "row_ptr, row_cols, col_ptr, col_rows, tile_rows, all int32) and (max_row_tiles, max_col_tiles).");
  m.def("any_nonzero", &any_nonzero_py, py::arg("buffers"), py::arg("nbytes"),
        "For each contiguous buffer (address, byte count): whether it holds a nonzero byte (a mask an alive entry).");
  m.def("tile_indices", &tile_indices_py, py::arg("masks"), py::arg("ns"), py::arg("ks"), py::arg("row_strides"),
        py::arg("block_n"), py::arg("block_k"), py::arg("threads"), py::arg("previous") = std::vector<uintptr_t>{},
        "tile_index of several masks in one call, the masks spread over `threads` threads: a list of its tuples. "
        "previous (optional, one per mask, 0 = none): the address of an earlier tiles_n x tiles_k byte map of the "
        "same geometry; None in place of the tuple where the new map equals it.");
  m.def("block_kernels_supported", &lthfast::block_kernels_supported,
        "Whether this CPU has the AVX2+FMA that block_rows_product / block_grad_weight need.");
  m.def("block_use_openmp", &lthfast::block_use_openmp, py::arg("enabled"),
        "Run lthfast._C's threads (block kernels, threshold, mask writes) on the OpenMP team torch loaded (True, "
        "the default) or on std::threads (False, for tests). Returns the previous setting. Process-wide.");
  m.def("block_rows_product", &block_rows_product_py, py::arg("block"), py::arg("a"), py::arg("lda"), py::arg("tiles"),
        py::arg("starts"), py::arg("a_cols"), py::arg("groups"), py::arg("bias"), py::arg("c"), py::arg("ldc"),
        py::arg("m"), py::arg("threads"),
        "fp32 C[:, bg:bg+b] = bias[bg:bg+b] + sum_s A[:, a_cols[s]:+b] @ tiles[s] over s in [starts[g], "
        "starts[g+1]) (int64), for every group g, block b a multiple of 16, over plain buffers (bias 0 = none).");
  m.def("block_grad_weight", &block_grad_weight_py, py::arg("block"), py::arg("dy"), py::arg("ldy"), py::arg("x"), py::arg("ldx"),
        py::arg("m"), py::arg("tile_rows"), py::arg("tile_cols"), py::arg("nnz"), py::arg("keep"), py::arg("n"),
        py::arg("k"), py::arg("dw"), py::arg("threads"),
        "fp32 dW tiles (tile_rows[t], tile_cols[t]) (int64, sorted by row) = (dY^T X) there, 0 where the tile's "
        "mask keep[t] ([nnz, b, b] bytes) is 0, written into dW [n, k] (cut at its edge); other entries untouched.");
  m.def("set_vector_kernels", &lthfast::set_vector_kernels, py::arg("enabled"),
        "Use the AVX2 kernels where the CPU has them (True, the default) or the scalar ones (False, for tests). "
        "Returns the previous setting. Process-wide: do not change it while a select runs.");
  bind_sparse_matmul(m);
  bind_sparse_optim(m);
}
