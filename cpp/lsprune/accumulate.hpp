// Streaming float64 second-order statistics of a layer's inputs x and targets y.
#pragma once

#include <vector>

#include "common.hpp"

namespace lsp {

// Caller-owned float64 sums, updated in place by Accumulator::update.
struct Sums {
  double* gram = nullptr;    // D x D row-major; only the upper triangle is accumulated
  double* cross = nullptr;   // D x m row-major (null when m == 0)
  double* sum_x = nullptr;   // D
  double* sum_y = nullptr;   // m
  double* sum_yy = nullptr;  // m, per-target sum of squares
  Index D = 0, m = 0;
};

// Adds batches into Sums with BLAS rank-k updates. Precision: float16/float32
// batches are multiplied in float32 (one SYRK/GEMM per batch, in chunks when the
// batch must be converted) into a float32 scratch that is added into the float64
// sums every `flush_rows` rows (and whenever the caller reads the sums: flush());
// a float64 batch (x or y) is multiplied in float64 straight into the sums. The
// scratch lives between calls, so small batches pay neither an allocation nor a
// D x D float64 addition each.
class Accumulator {
 public:
  Accumulator(Index D, Index m);
  // Adds x (N x D) and y (N x m, or null when m == 0). Validates shapes; if the
  // batch holds NaN/Inf (or float32 products overflow) it throws NonFiniteInput
  // (a std::invalid_argument) and the sums are exactly as before.
  void update(const MatrixView& x, const MatrixView* y, const Sums& sums);
  // Adds the pending float32 products into the sums (call before reading them).
  void flush(const Sums& sums);
  // Drops pending products (after the caller replaced or zeroed the sums).
  void discard() { pending_rows_ = 0; pending_big_ = 0; }
  Index pending_rows() const { return pending_rows_; }
  // Rows of float32 products accumulated before they are added in float64.
  void set_flush_rows(Index r) { flush_rows_ = r > 0 ? r : 1; }
  Index D() const { return D_; }
  Index m() const { return m_; }
  // Rows per converted chunk (0 = automatic); exposed for tests of the chunked path.
  void set_chunk_rows(Index r) { chunk_rows_ = r; }

 private:
  template <class T>
  void accumulate(const MatrixView& x, const MatrixView* y, const Sums& sums);
  Index D_, m_;
  Index chunk_rows_ = 0;
  Index flush_rows_ = 4096, pending_rows_ = 0;  // bounds float32 accumulation like a 4096-row batch
  double pending_big_ = 0;  // bound on |pending float32 entries| (Cauchy-Schwarz), against overflow
  std::vector<float> gram32_, cross32_, xbuf32_, ybuf32_;
  std::vector<double> xbuf64_, ybuf64_;
};

}  // namespace lsp

namespace lsp {
// Copies the upper triangle of a row-major n x n matrix onto its lower triangle.
void mirror_upper(double* a, Index n);
}  // namespace lsp

namespace lsp {
// Largest |a_ij - a_ji| and largest |a_ij| of a row-major n x n matrix; both are
// NaN when the matrix holds NaN/Inf. Used to validate user-supplied Gram matrices
// without D x D temporaries.
void symmetry_check(const double* a, Index n, double* max_asym, double* max_abs);
}  // namespace lsp
