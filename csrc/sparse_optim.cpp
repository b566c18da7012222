// Fused masked optimizer steps over the alive entries of a weight (placeholder until written).
#include <pybind11/pybind11.h>

namespace py = pybind11;

void bind_sparse_optim(py::module_& m) { (void)m; }
