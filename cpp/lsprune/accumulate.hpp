// Streaming float64 second-order statistics of a layer's inputs x and targets y.
#pragma once

#include <mutex>
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
// Scale: a float32 batch of very small or very large values is multiplied by a power of
// two (exact) before its float32 products are formed, and the scratch is scaled back when
// added, so float32 products never underflow or overflow (docs/design.md, "Numerics: scale").
// Thread safety: concurrent update()/flush() calls on one Accumulator are serialised by
// a mutex (the Python binding releases the GIL around them).
class Accumulator {
 public:
  Accumulator(Index D, Index m);
  // Adds x (N x D) and y (N x m, or null when m == 0). Validates shapes; if the
  // batch holds NaN/Inf it throws NonFiniteInput (a std::invalid_argument), if its
  // products leave float64's range InputOutOfRange; either way the sums are exactly as before.
  void update(const MatrixView& x, const MatrixView* y, const Sums& sums);
  // Adds the pending float32 products into the sums (call before reading them).
  void flush(const Sums& sums);
  // Drops pending products (after the caller replaced or zeroed the sums).
  void discard();
  Index pending_rows() const;
  // Rows of float32 products accumulated before they are added in float64.
  void set_flush_rows(Index r);
  Index D() const { return D_; }
  Index m() const { return m_; }
  // Rows per converted chunk (0 = automatic); exposed for tests of the chunked path.
  void set_chunk_rows(Index r);

 private:
  void check_shapes(const MatrixView& x, const MatrixView* y) const;
  void check_range(const MatrixView& x, const MatrixView* y, const std::vector<double>& sxx,
                   const std::vector<double>& syy, const Sums& s) const;
  void flush_locked(const Sums& sums);
  template <class T>
  void accumulate(const MatrixView& x, const MatrixView* y, const Sums& sums, int kx, int ky);
  Index D_, m_;
  Index chunk_rows_ = 0;
  Index flush_rows_ = 4096, pending_rows_ = 0;  // bounds float32 accumulation like a 4096-row batch
  double pending_big_ = 0;  // bound on |pending float32 entries| (Cauchy-Schwarz), against overflow
  int pending_kx_ = 0, pending_ky_ = 0;  // the pending products are of x 2^-kx and y 2^-ky
  std::vector<float> gram32_, cross32_, xbuf32_, ybuf32_;
  std::vector<double> xbuf64_, ybuf64_;
  mutable std::mutex mu_;  // guards everything above and the caller's sums during update/flush
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
