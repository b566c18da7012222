// pybind11 bindings for lthfast._C. Placeholder until the threshold kernels land.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "lthfast C++ extension: global magnitude threshold by radix select";
  m.attr("ABI_VERSION") = 1;
}
