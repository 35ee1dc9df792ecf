// Shared types and error classes of the lsprune engine (no Python here).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace lsp {

using Index = std::int64_t;

// User errors (bad shapes, bad options) -> Python ValueError (std::invalid_argument).
// NaN/Inf in streamed data -> lsprune.NonFiniteInputError (a ValueError): callers
// decide on the type, never on the message.
// Numerical breakdown that cannot be recovered from -> lsprune.NumericalError.
struct NonFiniteInput : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

struct NumericalError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Element types a streamed batch may have.
enum class DType { F16 = 0, F32 = 1, F64 = 2 };

// A strided 2-D view on caller-owned data, strides in elements (may be any
// non-negative values, e.g. a transposed or sliced NumPy array).
struct MatrixView {
  const void* data = nullptr;
  DType dtype = DType::F64;
  Index rows = 0, cols = 0;
  Index row_stride = 0, col_stride = 0;
};

}  // namespace lsp
