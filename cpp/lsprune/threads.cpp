#include "threads.hpp"

#include <omp.h>

#include <stdexcept>

#include "blas.hpp"

namespace lsp {

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("the number of threads must be >= 1");
  omp_set_num_threads(n);
  blas::set_num_threads(n);
}

int num_threads() { return omp_get_max_threads(); }

}  // namespace lsp
