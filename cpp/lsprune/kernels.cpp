#include "kernels.hpp"

#include <algorithm>
#include <cstring>
#include <vector>

#include <omp.h>

#include "blas.hpp"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(LSPRUNE_NO_CLONES)
#define LSP_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LSP_CLONES
#endif

namespace lsp::kern {
namespace {

typedef double v8d __attribute__((vector_size(64), aligned(8)));

// One column block of A^T C: acc (g x w) = sum_k A[k, :]^T C[k, 0:w]. Eight rows
// of C are held in registers per 8-column chunk and fed to all g accumulators,
// so each C element is loaded once and each accumulator load/store carries eight
// FMAs (the kernel is bound by reading C).
LSP_CLONES
void at_c_block(const double* __restrict A, Index K, Index g, const double* __restrict C, Index ldc, Index w,
                double* __restrict acc) {
  std::memset(acc, 0, sizeof(double) * std::size_t(g) * w);
  const Index w8 = w - w % 8;
  Index k = 0;
  for (; k + 7 < K; k += 8) {
    const double* a = A + k * g;
    const double* c = C + k * ldc;
    for (Index j = 0; j < w8; j += 8) {
      v8d x[8];
      for (int r = 0; r < 8; ++r) std::memcpy(&x[r], c + r * ldc + j, 64);
      for (Index i = 0; i < g; ++i) {
        v8d o;
        std::memcpy(&o, acc + i * w + j, 64);
        o += ((a[i] * x[0] + a[g + i] * x[1]) + (a[2 * g + i] * x[2] + a[3 * g + i] * x[3])) +
             ((a[4 * g + i] * x[4] + a[5 * g + i] * x[5]) + (a[6 * g + i] * x[6] + a[7 * g + i] * x[7]));
        std::memcpy(acc + i * w + j, &o, 64);
      }
    }
    for (Index j = w8; j < w; ++j)
      for (Index i = 0; i < g; ++i) {
        double t = 0;
        for (int r = 0; r < 8; ++r) t += a[r * g + i] * c[r * ldc + j];
        acc[i * w + j] += t;
      }
  }
  for (; k < K; ++k) {
    const double* a = A + k * g;
    const double* c = C + k * ldc;
    for (Index i = 0; i < g; ++i)
      for (Index j = 0; j < w; ++j) acc[i * w + j] += a[i] * c[j];
  }
}

}  // namespace

void at_c(const double* A, Index K, Index g, const double* C, Index ldc, Index n, double* out, Index ldo) {
  if (n <= 0 || g <= 0) return;
  if (K == 0) {
    for (Index i = 0; i < g; ++i) std::fill(out + i * ldo, out + i * ldo + n, 0.0);
    return;
  }
  if (g > 16) {  // enough arithmetic per byte for the BLAS kernel
    blas::gemm(true, false, g, n, K, 1.0, A, g, C, ldc, 0.0, out, ldo);
    return;
  }
  // Accumulators (g x bw) of ~24 KB stay in L1 beside the four C rows.
  Index bw = std::max<Index>(64, std::min<Index>(1024, (3072 / g) / 8 * 8));
  // Enough blocks for every thread when the work is worth splitting.
  const Index nt = omp_get_max_threads();
  if (K * n * g > 100000 && n < 2 * nt * bw) bw = std::max<Index>(64, (n / (2 * nt)) / 8 * 8);
  const Index nblocks = (n + bw - 1) / bw;
#pragma omp parallel if (K * n * g > 100000 && nblocks > 1)
  {
    std::vector<double> accv(std::size_t(g) * bw);
    double* acc = accv.data();
#pragma omp for schedule(static)
    for (Index b = 0; b < nblocks; ++b) {
      const Index cb = b * bw, w = std::min(bw, n - cb);
      at_c_block(A, K, g, C + cb, ldc, w, acc);
      for (Index i = 0; i < g; ++i) std::memcpy(out + i * ldo + cb, acc + i * w, sizeof(double) * w);
    }
  }
}

LSP_CLONES
void sub_ct_z(double* R, Index ldr, Index rows, const double* c, Index ldc, Index gz, const double* z, Index m) {
  for (Index a = 0; a < rows; ++a) {
    double* r = R + a * ldr;
    for (Index i = 0; i < gz; ++i) {
      const double s = c[i * ldc + a];
      const double* zi = z + i * m;
      for (Index k = 0; k < m; ++k) r[k] -= s * zi[k];
    }
  }
}

namespace {

// Rows of one group with G columns (G known at compile time so the 8-wide
// chunks of all rows stay in registers): R_I -= c_I^T z, then the gain
// ||L^{-1} R_I||^2 (solve) or ||R_I||^2, in one pass over R_I.
template <int G>
__attribute__((always_inline)) inline double fused_fixed(double* __restrict R, const double* __restrict cc, Index gJ,
                                                         const double* __restrict z, Index m,
                                                         const double* __restrict L, bool solve) {
  double inv[G];
  if (solve)
    for (int a = 0; a < G; ++a) inv[a] = 1.0 / L[a * G + a];
  v8d acc = {0, 0, 0, 0, 0, 0, 0, 0};
  const Index m8 = m - m % 8;
  for (Index j = 0; j < m8; j += 8) {
    v8d x[G];
    for (int a = 0; a < G; ++a) std::memcpy(&x[a], R + a * m + j, 64);
    for (Index i = 0; i < gJ; ++i) {
      v8d zi;
      std::memcpy(&zi, z + i * m + j, 64);
      for (int a = 0; a < G; ++a) x[a] -= cc[a * gJ + i] * zi;
    }
    for (int a = 0; a < G; ++a) std::memcpy(R + a * m + j, &x[a], 64);
    if (solve) {
      for (int a = 0; a < G; ++a) {
        for (int k = 0; k < a; ++k) x[a] -= L[a * G + k] * x[k];
        x[a] *= inv[a];
      }
    }
    for (int a = 0; a < G; ++a) acc += x[a] * x[a];
  }
  double total = 0;
  for (int q = 0; q < 8; ++q) total += acc[q];
  for (Index j = m8; j < m; ++j) {
    double x[G];
    for (int a = 0; a < G; ++a) {
      double v = R[a * m + j];
      for (Index i = 0; i < gJ; ++i) v -= cc[a * gJ + i] * z[i * m + j];
      R[a * m + j] = v;
      x[a] = v;
    }
    if (solve)
      for (int a = 0; a < G; ++a) {
        for (int k = 0; k < a; ++k) x[a] -= L[a * G + k] * x[k];
        x[a] *= inv[a];
      }
    for (int a = 0; a < G; ++a) total += x[a] * x[a];
  }
  return total;
}

}  // namespace

LSP_CLONES
double update_gain(double* R, Index gs, const double* cc, Index gJ, const double* z, Index m, const double* L,
                   bool solve, double* work) {
  switch (gs) {
    case 1: return fused_fixed<1>(R, cc, gJ, z, m, L, solve);
    case 2: return fused_fixed<2>(R, cc, gJ, z, m, L, solve);
    case 3: return fused_fixed<3>(R, cc, gJ, z, m, L, solve);
    case 4: return fused_fixed<4>(R, cc, gJ, z, m, L, solve);
    case 5: return fused_fixed<5>(R, cc, gJ, z, m, L, solve);
    case 6: return fused_fixed<6>(R, cc, gJ, z, m, L, solve);
    case 7: return fused_fixed<7>(R, cc, gJ, z, m, L, solve);
    case 8: return fused_fixed<8>(R, cc, gJ, z, m, L, solve);
    case 9: return fused_fixed<9>(R, cc, gJ, z, m, L, solve);
    default: break;
  }
  // Large groups: update row by row, then solve a copy.
  for (Index a = 0; a < gs; ++a) {
    double* r = R + a * m;
    for (Index i = 0; i < gJ; ++i) {
      const double s = cc[a * gJ + i];
      const double* zi = z + i * m;
      for (Index k = 0; k < m; ++k) r[k] -= s * zi[k];
    }
  }
  if (!solve) return sumsq(R, gs * m);
  std::memcpy(work, R, sizeof(double) * gs * m);
  return lower_solve_sumsq(L, gs, work, m);
}

LSP_CLONES
double lower_solve_sumsq(const double* L, Index g, double* B, Index n) {
  double total = 0;
  for (Index i = 0; i < g; ++i) {
    double* bi = B + i * n;
    for (Index k = 0; k < i; ++k) {
      const double l = L[i * g + k];
      const double* bk = B + k * n;
      for (Index j = 0; j < n; ++j) bi[j] -= l * bk[j];
    }
    const double inv = 1.0 / L[i * g + i];
    double s = 0;
    for (Index j = 0; j < n; ++j) {
      bi[j] *= inv;
      s += bi[j] * bi[j];
    }
    total += s;
  }
  return total;
}

template <class T>
__attribute__((always_inline)) inline void colsum_impl(const T* x, Index rows, Index rs, Index D,
                                                       double* __restrict s, double* __restrict q) {
  for (Index r = 0; r < rows; ++r) {
    const T* __restrict row = x + r * rs;
    for (Index j = 0; j < D; ++j) {
      const double a = row[j];
      s[j] += a;
      q[j] += a * a;
    }
  }
}

// One clone set per input type; the loop body is inlined into each clone.
LSP_CLONES
void colsum_rows(const float* x, Index rows, Index rs, Index D, double* s, double* q) {
  colsum_impl(x, rows, rs, D, s, q);
}

LSP_CLONES
void colsum_rows(const double* x, Index rows, Index rs, Index D, double* s, double* q) {
  colsum_impl(x, rows, rs, D, s, q);
}

LSP_CLONES
double sumsq(const double* x, Index n) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  Index i = 0;
  for (; i + 3 < n; i += 4) {
    s0 += x[i] * x[i];
    s1 += x[i + 1] * x[i + 1];
    s2 += x[i + 2] * x[i + 2];
    s3 += x[i + 3] * x[i + 3];
  }
  for (; i < n; ++i) s0 += x[i] * x[i];
  return (s0 + s1) + (s2 + s3);
}

LSP_CLONES
void axpy_neg(double a, const double* x, double* y, Index n) {
  for (Index i = 0; i < n; ++i) y[i] -= a * x[i];
}

}  // namespace lsp::kern
