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

// Finite data whose second-order sums leave float64's range (squares that overflow, or
// that underflow so far that they lose precision) -> lsprune.InputRangeError (a ValueError).
struct InputOutOfRange : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// Range rules of the float64 sums (docs/design.md, "Numerics: scale").
namespace range {
// A Gram diagonal / sum of squares in (0, 2^kMinSumSqExp) has lost precision to underflow
// (its products were subnormal or zero): refused rather than solved wrongly.
constexpr int kMinSumSqExp = -1000;
// Problem works in rescaled units (powers of two) when its largest Gram diagonal or its target
// energy lies outside 2^[-kUnitBand, kUnitBand]; inside, the solvers' products cannot leave range.
constexpr int kUnitBand = 128;
}  // namespace range

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
