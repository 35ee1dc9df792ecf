#include "accumulate.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "blas.hpp"
#include "kernels.hpp"

namespace lsp {
namespace {

// Exact IEEE half -> float conversion by table (portable; no F16C needed).
const float* half_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(65536);
    for (std::uint32_t h = 0; h < 65536; ++h) {
      std::uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu, bits;
      if (exp == 0) {
        if (man == 0) {
          bits = sign;
        } else {  // subnormal: renormalize
          int e = -1;
          do { ++e; man <<= 1; } while ((man & 0x400u) == 0);
          bits = sign | (std::uint32_t(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
      } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
      } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
      }
      std::memcpy(&t[h], &bits, 4);
    }
    return t;
  }();
  return table.data();
}

template <class S>
struct Reader;  // S = storage type; read(i) returns the value as double/float
template <>
struct Reader<float> {
  const float* p;
  float operator()(Index i) const { return p[i]; }
};
template <>
struct Reader<double> {
  const double* p;
  double operator()(Index i) const { return p[i]; }
};
template <>
struct Reader<std::uint16_t> {
  const std::uint16_t* p;
  const float* t = half_table();
  float operator()(Index i) const { return t[p[i]]; }
};

template <class F>
void dispatch(DType dt, const void* data, F&& f) {
  switch (dt) {
    case DType::F16: f(Reader<std::uint16_t>{static_cast<const std::uint16_t*>(data)}); break;
    case DType::F32: f(Reader<float>{static_cast<const float*>(data)}); break;
    case DType::F64: f(Reader<double>{static_cast<const double*>(data)}); break;
  }
}

// Column sums (and optionally sums of squares) in float64 of a strided view.
// Deterministic for a given thread count (fixed partition, ordered reduction).
void column_sums(const MatrixView& v, double* sum, double* sumsq) {
  const Index N = v.rows, D = v.cols, rs = v.row_stride, cs = v.col_stride;
  std::fill(sum, sum + D, 0.0);
  if (sumsq) std::fill(sumsq, sumsq + D, 0.0);
  if (N == 0 || D == 0) return;
  dispatch(v.dtype, v.data, [&](auto rd) {
    if (cs == 1 && D < N) {  // row-contiguous: threads take row ranges
      int nt = omp_get_max_threads();
      std::vector<double> part(std::size_t(nt) * D * (sumsq ? 2 : 1), 0.0);
#pragma omp parallel num_threads(nt)
      {
        int t = omp_get_thread_num(), T = omp_get_num_threads();
        Index r0 = N * t / T, r1 = N * (t + 1) / T;
        double* s = part.data() + std::size_t(t) * D * (sumsq ? 2 : 1);
        double* q = s + D;
        using S = std::remove_cv_t<std::remove_pointer_t<decltype(rd.p)>>;
        bool done = false;
        if constexpr (!std::is_same<S, std::uint16_t>::value) {
          if (sumsq) {  // the hot case: an ISA-dispatched kernel
            kern::colsum_rows(rd.p + r0 * rs, r1 - r0, rs, D, s, q);
            done = true;
          }
        }
        for (Index r = done ? r1 : r0; r < r1; ++r) {
          Index base = r * rs;
          if (sumsq) {
            for (Index j = 0; j < D; ++j) { double a = rd(base + j); s[j] += a; q[j] += a * a; }
          } else {
            for (Index j = 0; j < D; ++j) s[j] += rd(base + j);
          }
        }
      }
      for (int t = 0; t < nt; ++t) {
        const double* s = part.data() + std::size_t(t) * D * (sumsq ? 2 : 1);
        for (Index j = 0; j < D; ++j) sum[j] += s[j];
        if (sumsq) for (Index j = 0; j < D; ++j) sumsq[j] += s[D + j];
      }
    } else {  // threads take columns
#pragma omp parallel for schedule(static)
      for (Index j = 0; j < D; ++j) {
        double s = 0, q = 0;
        Index base = j * cs;
        for (Index r = 0; r < N; ++r) { double a = rd(base + r * rs); s += a; q += a * a; }
        sum[j] = s;
        if (sumsq) sumsq[j] = q;
      }
    }
  });
}

bool all_finite(const double* p, Index n) {
  for (Index i = 0; i < n; ++i)
    if (!std::isfinite(p[i])) return false;
  return true;
}

template <class T>
constexpr DType dtype_of();
template <>
constexpr DType dtype_of<float>() { return DType::F32; }
template <>
constexpr DType dtype_of<double>() { return DType::F64; }

// A matrix usable by BLAS without a copy: unit stride in one dimension.
bool blas_ready(const MatrixView& v, DType want) {
  if (v.dtype != want) return false;
  if (v.col_stride == 1 && (v.row_stride >= v.cols || v.rows <= 1)) return true;
  if (v.row_stride == 1 && (v.col_stride >= v.rows || v.cols <= 1)) return true;
  return false;
}

// BLAS operand for rows [r0, r0+n) of a view: pointer, leading dimension and
// whether the memory holds the matrix (row-major) or its transpose.
template <class T>
struct Operand {
  const T* p;
  Index ld;
  bool transposed;  // memory is cols x rows row-major
};

template <class T>
Operand<T> direct_operand(const MatrixView& v, Index r0) {
  const T* base = static_cast<const T*>(v.data);
  if (v.col_stride == 1 && (v.row_stride >= v.cols || v.rows <= 1))
    return {base + r0 * v.row_stride, std::max<Index>(v.row_stride, v.cols), false};
  return {base + r0, std::max<Index>(v.col_stride, v.rows), true};
}

// Converts rows [r0, r0+n) to a contiguous row-major T buffer, times `scale` (a power of two: exact).
template <class T>
Operand<T> copy_operand(const MatrixView& v, Index r0, Index n, std::vector<T>& buf, T scale) {
  const Index D = v.cols;
  if (buf.size() < std::size_t(n * D)) buf.resize(std::size_t(n * D));
  T* out = buf.data();
  dispatch(v.dtype, v.data, [&](auto rd) {
#pragma omp parallel for schedule(static)
    for (Index r = 0; r < n; ++r) {
      Index base = (r0 + r) * v.row_stride;
      T* o = out + r * D;
      for (Index j = 0; j < D; ++j) o[j] = static_cast<T>(rd(base + j * v.col_stride)) * scale;
    }
  });
  return {out, D, false};
}

double max_of(const std::vector<double>& v) {
  double b = 0;
  for (double a : v) b = std::max(b, a);
  return b;
}

// Power-of-two exponent k (a multiple of 32; 0 for ordinary magnitudes) that brings a
// batch's largest column sum of squares `big` within 2^(-64, 64) once the batch is scaled
// by 2^-k: its float32 products then neither underflow nor overflow.
int float32_exponent(double big) {
  if (!(big > 0)) return 0;
  // Truncation keeps |ilogb(big) - 2k| < 64; |k| <= 96 keeps 2^-k a normal float32 (float32
  // data's squares lie within 2^[-298, 256], so the clamp only matters near its limits).
  return std::clamp(32 * (std::ilogb(big) / 64), -96, 96);
}

// Whether a view holds a non-zero value (the rare path: its sums of squares underflowed).
bool any_nonzero(const MatrixView& v) {
  bool found = false;
  dispatch(v.dtype, v.data, [&](auto rd) {
    for (Index r = 0; r < v.rows && !found; ++r)
      for (Index j = 0; j < v.cols && !found; ++j) found = double(rd(r * v.row_stride + j * v.col_stride)) != 0.0;
  });
  return found;
}

}  // namespace

Accumulator::Accumulator(Index D, Index m) : D_(D), m_(m) {
  if (D <= 0) throw std::invalid_argument("n_features must be positive");
  if (m < 0) throw std::invalid_argument("n_targets must be >= 0");
}

void Accumulator::check_shapes(const MatrixView& x, const MatrixView* y) const {
  if (x.cols != D_)
    throw std::invalid_argument("x has " + std::to_string(x.cols) + " columns; expected (N, " + std::to_string(D_) +
                                ")");
  if (m_ > 0 && !y) throw std::invalid_argument("these statistics have targets: pass y of shape (N, " +
                                                std::to_string(m_) + ")");
  if (m_ == 0 && y) throw std::invalid_argument("these statistics were created with n_targets=0; y must be None");
  if (y && y->cols != m_)
    throw std::invalid_argument("y has " + std::to_string(y->cols) + " columns; expected (N, " + std::to_string(m_) +
                                ")");
  if (y && y->rows != x.rows)
    throw std::invalid_argument("x has " + std::to_string(x.rows) + " rows but y has " + std::to_string(y->rows));
}

// Refuses (InputOutOfRange) a batch after which the float64 sums of squares of x or y would
// overflow, or be non-zero data with a largest sum of squares below 2^kMinSumSqExp (its
// products underflowed: the Gram would be wrong, not just imprecise). Float32 data never
// trips it (its squares lie within 2^[-298, 256]). Called with the lock held.
void Accumulator::check_range(const MatrixView& x, const MatrixView* y, const std::vector<double>& sxx,
                              const std::vector<double>& syy, const Sums& s) const {
  const double tiny = std::ldexp(1.0, range::kMinSumSqExp), fg = std::ldexp(1.0, 2 * pending_kx_);
  double gx = 0, gy = 0;  // largest diagonal of the sums after this batch
  for (Index j = 0; j < D_; ++j) {
    const std::size_t jj = std::size_t(j) * D_ + j;
    gx = std::max(gx, s.gram[jj] + sxx[j] + (pending_rows_ ? double(gram32_[jj]) * fg : 0.0));
  }
  for (Index j = 0; j < m_; ++j) gy = std::max(gy, s.sum_yy[j] + syy[j]);
  auto check = [&](const char* name, double g, const MatrixView& v) {
    if (!std::isfinite(g))
      throw InputOutOfRange(std::string(name) + "'s values are too large for float64 statistics: the sums of their "
                            "squares overflow float64; scale " + name + " down (e.g. by a power of two); the batch "
                            "was not added");
    if (g < tiny && any_nonzero(v))
      throw InputOutOfRange(std::string(name) + "'s values are too small for float64 statistics: the sums of their "
                            "squares underflow float64 (largest below 2^" + std::to_string(range::kMinSumSqExp) +
                            "); scale " + name + " up (e.g. by a power of two); the batch was not added");
  };
  check("x", gx, x);
  if (y) check("y", gy, *y);
}

void Accumulator::update(const MatrixView& x, const MatrixView* y, const Sums& s) {
  check_shapes(x, y);
  if (x.rows == 0) return;

  // First- and second-moment column sums into temporaries (outside the lock: they only read
  // the batch): they are the NaN/Inf check, and by Cauchy-Schwarz bound every product entry.
  const Index D = D_, m = m_;
  std::vector<double> sx(D), sxx(D), sy(m), syy(m);
  column_sums(x, sx.data(), sxx.data());
  if (!all_finite(sx.data(), D))
    throw NonFiniteInput("x contains NaN or Inf (or overflows float64); the batch was not added");
  if (y) {
    column_sums(*y, sy.data(), syy.data());
    if (!all_finite(sy.data(), m))
      throw NonFiniteInput("y contains NaN or Inf (or overflows float64); the batch was not added");
  }
  std::lock_guard<std::mutex> lock(mu_);
  check_range(x, y, sxx, syy, s);
  if (x.dtype == DType::F64 || (y && y->dtype == DType::F64)) {
    accumulate<double>(x, y, s, 0, 0);
  } else {
    // float32 products of the batch scaled by 2^-kx, 2^-ky; pending products of other
    // exponents (or that could overflow float32 together with these) are added first.
    const int kx = float32_exponent(max_of(sxx)), ky = y ? float32_exponent(max_of(syy)) : 0;
    const double big = std::max(std::ldexp(max_of(sxx), -2 * kx), std::ldexp(max_of(syy), -2 * ky));
    if (pending_rows_ && (kx != pending_kx_ || ky != pending_ky_ || pending_big_ + big > 1e37)) flush_locked(s);
    accumulate<float>(x, y, s, kx, ky);
    pending_kx_ = kx;
    pending_ky_ = ky;
    pending_rows_ += x.rows;
    pending_big_ += big;
    if (pending_rows_ >= flush_rows_) flush_locked(s);
  }
  for (Index j = 0; j < D; ++j) s.sum_x[j] += sx[j];
  for (Index j = 0; j < m; ++j) {
    s.sum_y[j] += sy[j];
    s.sum_yy[j] += syy[j];
  }
}

template <class T>
void Accumulator::accumulate(const MatrixView& x, const MatrixView* y, const Sums& s, int kx, int ky) {
  const Index N = x.rows, D = D_, m = m_;
  constexpr bool f32 = std::is_same<T, float>::value;

  // float32 products go to the scratch (added by flush()); float64 ones straight
  // into the sums (nothing can fail after the checks in update()).
  const DType want = dtype_of<T>();
  const bool xd = kx == 0 && blas_ready(x, want), yd = !y || (ky == 0 && blas_ready(*y, want));
  const T xs = T(std::ldexp(1.0, -kx)), ys = T(std::ldexp(1.0, -ky));  // exact: |k| <= 96
  Index chunk = N;
  if (!(xd && yd)) {
    Index width = D + m;
    chunk = chunk_rows_ > 0 ? chunk_rows_ : std::max<Index>(256, (Index(4) << 20) / std::max<Index>(width, 1));
  }
  T* G;
  T* B;
  if constexpr (f32) {
    gram32_.resize(std::size_t(D) * D);
    cross32_.resize(std::size_t(D) * m);
    G = gram32_.data();
    B = cross32_.data();
  } else {
    G = s.gram;
    B = s.cross;
  }
  std::vector<T>& xbuf = [&]() -> std::vector<T>& {
    if constexpr (f32) return xbuf32_; else return xbuf64_;
  }();
  std::vector<T>& ybuf = [&]() -> std::vector<T>& {
    if constexpr (f32) return ybuf32_; else return ybuf64_;
  }();
  for (Index r0 = 0; r0 < N; r0 += chunk) {
    const Index n = std::min(chunk, N - r0);
    const T beta = (f32 && r0 == 0 && pending_rows_ == 0) ? T(0) : T(1);
    Operand<T> a = xd ? direct_operand<T>(x, r0) : copy_operand<T>(x, r0, n, xbuf, xs);
    if (a.transposed)
      blas::syrk_n(D, n, T(1), a.p, a.ld, beta, G, D);
    else
      blas::syrk_t(D, n, T(1), a.p, a.ld, beta, G, D);
    if (y && m > 0) {
      Operand<T> b = yd ? direct_operand<T>(*y, r0) : copy_operand<T>(*y, r0, n, ybuf, ys);
      // B (D x m) = x^T y
      blas::gemm(!a.transposed, b.transposed, D, m, n, T(1), a.p, a.ld, b.p, b.ld, beta, B, m);
    }
  }
}

void Accumulator::flush(const Sums& s) {
  std::lock_guard<std::mutex> lock(mu_);
  flush_locked(s);
}

void Accumulator::discard() {
  std::lock_guard<std::mutex> lock(mu_);
  pending_rows_ = 0;
  pending_big_ = 0;
}

Index Accumulator::pending_rows() const {
  std::lock_guard<std::mutex> lock(mu_);
  return pending_rows_;
}

void Accumulator::set_flush_rows(Index r) {
  std::lock_guard<std::mutex> lock(mu_);
  flush_rows_ = r > 0 ? r : 1;
}

void Accumulator::set_chunk_rows(Index r) {
  std::lock_guard<std::mutex> lock(mu_);
  chunk_rows_ = r;
}

void Accumulator::flush_locked(const Sums& s) {
  if (pending_rows_ == 0) return;
  const Index D = D_, m = m_;
  const float* G = gram32_.data();
  const float* B = cross32_.data();
  // Undo the batches' power-of-two scaling (exact; both factors are 1 for ordinary data).
  const double fg = std::ldexp(1.0, 2 * pending_kx_), fb = std::ldexp(1.0, pending_kx_ + pending_ky_);
#pragma omp parallel for schedule(dynamic, 16)
  for (Index i = 0; i < D; ++i) {
    double* g = s.gram + i * D;
    const float* h = G + i * D;
    for (Index j = i; j < D; ++j) g[j] += double(h[j]) * fg;
  }
  if (m > 0) {
#pragma omp parallel for schedule(static)
    for (Index i = 0; i < D; ++i)
      for (Index j = 0; j < m; ++j) s.cross[i * m + j] += double(B[i * m + j]) * fb;
  }
  pending_rows_ = 0;
  pending_big_ = 0;
}

template void Accumulator::accumulate<float>(const MatrixView&, const MatrixView*, const Sums&, int, int);
template void Accumulator::accumulate<double>(const MatrixView&, const MatrixView*, const Sums&, int, int);

}  // namespace lsp

namespace lsp {
void mirror_upper(double* a, Index n) {
  // Blocked so both the read (column) and write (row) sides stay in cache.
  const Index bs = 64;
#pragma omp parallel for schedule(dynamic, 1)
  for (Index ib = 0; ib < n; ib += bs)
    for (Index jb = 0; jb <= ib; jb += bs)
      for (Index i = ib; i < std::min(ib + bs, n); ++i)
        for (Index j = jb; j < std::min({jb + bs, n, i}); ++j) a[std::size_t(i) * n + j] = a[std::size_t(j) * n + i];
}
}  // namespace lsp

namespace lsp {
void symmetry_check(const double* a, Index n, double* max_asym, double* max_abs) {
  const Index bs = 64;
  double asym = 0, mx = 0;
  bool finite = true;
#pragma omp parallel for schedule(dynamic, 1) reduction(max : asym, mx) reduction(&& : finite)
  for (Index ib = 0; ib < n; ib += bs) {
    for (Index jb = 0; jb <= ib; jb += bs)
      for (Index i = ib; i < std::min(ib + bs, n); ++i)
        for (Index j = jb; j < std::min({jb + bs, n, i + 1}); ++j) {
          const double u = a[std::size_t(i) * n + j], v = a[std::size_t(j) * n + i];
          finite = finite && std::isfinite(u) && std::isfinite(v);
          asym = std::max(asym, std::abs(u - v));
          mx = std::max(mx, std::max(std::abs(u), std::abs(v)));
        }
  }
  *max_asym = finite ? asym : std::nan("");
  *max_abs = finite ? mx : std::nan("");
}
}  // namespace lsp
