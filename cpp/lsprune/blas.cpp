#include "blas.hpp"

#include <climits>
#include <cstddef>
#include <vector>

#include <cblas.h>

// LAPACK's Fortran entry points of the scipy-openblas32 wheel (hidden string
// lengths at the end, as gfortran passes them).
extern "C" {
void scipy_dpotrf_(const char* uplo, const int* n, double* a, const int* lda, int* info, std::size_t);
void scipy_dpotri_(const char* uplo, const int* n, double* a, const int* lda, int* info, std::size_t);
void scipy_dsyevd_(const char* jobz, const char* uplo, const int* n, double* a, const int* lda, double* w,
                   double* work, const int* lwork, int* iwork, const int* liwork, int* info, std::size_t,
                   std::size_t);
}

namespace lsp::blas {
namespace {

int ck(Index v) {
  if (v < 0 || v > INT_MAX) throw std::invalid_argument("matrix dimension exceeds the 32-bit BLAS limit");
  return static_cast<int>(v);
}
int ld(Index v) { return ck(v < 1 ? 1 : v); }
CBLAS_TRANSPOSE tr(bool t) { return t ? CblasTrans : CblasNoTrans; }

}  // namespace

void syrk_t(Index n, Index k, float alpha, const float* A, Index lda, float beta, float* C, Index ldc) {
  if (n == 0) return;
  scipy_cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, ck(n), ck(k), alpha, A, ld(lda), beta, C, ld(ldc));
}
void syrk_t(Index n, Index k, double alpha, const double* A, Index lda, double beta, double* C, Index ldc) {
  if (n == 0) return;
  scipy_cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, ck(n), ck(k), alpha, A, ld(lda), beta, C, ld(ldc));
}
void syrk_n(Index n, Index k, float alpha, const float* A, Index lda, float beta, float* C, Index ldc) {
  if (n == 0) return;
  scipy_cblas_ssyrk(CblasRowMajor, CblasUpper, CblasNoTrans, ck(n), ck(k), alpha, A, ld(lda), beta, C, ld(ldc));
}
void syrk_n(Index n, Index k, double alpha, const double* A, Index lda, double beta, double* C, Index ldc) {
  if (n == 0) return;
  scipy_cblas_dsyrk(CblasRowMajor, CblasUpper, CblasNoTrans, ck(n), ck(k), alpha, A, ld(lda), beta, C, ld(ldc));
}

void syr2k_t(Index n, Index k, double alpha, const double* A, Index lda, const double* B, Index ldb, double beta,
             double* C, Index ldc) {
  if (n == 0) return;
  scipy_cblas_dsyr2k(CblasRowMajor, CblasUpper, CblasTrans, ck(n), ck(k), alpha, A, ld(lda), B, ld(ldb), beta, C,
                     ld(ldc));
}
void gemv_t(Index k, Index n, double alpha, const double* A, Index lda, const double* x, double beta, double* y) {
  if (n == 0) return;
  if (k == 0) {
    for (Index j = 0; j < n; ++j) y[j] *= beta;
    return;
  }
  scipy_cblas_dgemv(CblasRowMajor, CblasTrans, ck(k), ck(n), alpha, A, ld(lda), x, 1, beta, y, 1);
}

void gemm(bool ta, bool tb, Index m, Index n, Index k, float alpha, const float* A, Index lda, const float* B,
          Index ldb, float beta, float* C, Index ldc) {
  if (m == 0 || n == 0) return;
  scipy_cblas_sgemm(CblasRowMajor, tr(ta), tr(tb), ck(m), ck(n), ck(k), alpha, A, ld(lda), B, ld(ldb), beta, C,
                    ld(ldc));
}
void gemm(bool ta, bool tb, Index m, Index n, Index k, double alpha, const double* A, Index lda, const double* B,
          Index ldb, double beta, double* C, Index ldc) {
  if (m == 0 || n == 0) return;
  scipy_cblas_dgemm(CblasRowMajor, tr(ta), tr(tb), ck(m), ck(n), ck(k), alpha, A, ld(lda), B, ld(ldb), beta, C,
                    ld(ldc));
}

// Row-major upper == column-major lower, so LAPACK is called with 'L' on the same
// memory (no transposed copy of a possibly multi-GB matrix).
int potrf_upper(Index n, double* A, Index lda) {
  if (n == 0) return 0;
  int nn = ck(n), la = ld(lda), info = 0;
  scipy_dpotrf_("L", &nn, A, &la, &info, 1);
  return info;
}
int potrf_upper_checked(Index n, double* A, Index lda, double rcond) {
  std::vector<double> d(n);
  for (Index i = 0; i < n; ++i) d[i] = A[i * lda + i];
  int info = potrf_upper(n, A, lda);
  if (info != 0) return info;
  for (Index i = 0; i < n; ++i) {
    const double u = A[i * lda + i];
    if (!(u * u > rcond * d[i])) return int(i + 1);
  }
  return 0;
}

int potri_upper(Index n, double* A, Index lda) {
  if (n == 0) return 0;
  int nn = ck(n), la = ld(lda), info = 0;
  scipy_dpotri_("L", &nn, A, &la, &info, 1);
  return info;
}
void trsm_upper_t(Index n, Index nrhs, const double* U, Index ldu, double* B, Index ldb) {
  if (n == 0 || nrhs == 0) return;
  scipy_cblas_dtrsm(CblasRowMajor, CblasLeft, CblasUpper, CblasTrans, CblasNonUnit, ck(n), ck(nrhs), 1.0, U, ld(ldu),
                    B, ld(ldb));
}
void trsm_upper_n(Index n, Index nrhs, const double* U, Index ldu, double* B, Index ldb) {
  if (n == 0 || nrhs == 0) return;
  scipy_cblas_dtrsm(CblasRowMajor, CblasLeft, CblasUpper, CblasNoTrans, CblasNonUnit, ck(n), ck(nrhs), 1.0, U,
                    ld(ldu), B, ld(ldb));
}
void trsm_lower_t(Index n, Index nrhs, const double* L, Index ldl, double* B, Index ldb) {
  if (n == 0 || nrhs == 0) return;
  scipy_cblas_dtrsm(CblasRowMajor, CblasLeft, CblasLower, CblasTrans, CblasNonUnit, ck(n), ck(nrhs), 1.0, L, ld(ldl),
                    B, ld(ldb));
}

// Column-major eigenvector columns are rows of the row-major buffer.
int syevd(Index n, double* A, Index lda, double* w) {
  if (n == 0) return 0;
  int nn = ck(n), la = ld(lda), info = 0, lwork = -1, liwork = -1, iw = 0;
  double wq = 0;
  scipy_dsyevd_("V", "L", &nn, A, &la, w, &wq, &lwork, &iw, &liwork, &info, 1, 1);
  if (info != 0) return info;
  lwork = int(wq) + 1;
  liwork = iw + 1;
  std::vector<double> work(lwork);
  std::vector<int> iwork(liwork);
  scipy_dsyevd_("V", "L", &nn, A, &la, w, work.data(), &lwork, iwork.data(), &liwork, &info, 1, 1);
  return info;
}

int num_threads() { return scipy_openblas_get_num_threads(); }
void set_num_threads(int n) { scipy_openblas_set_num_threads(n); }

}  // namespace lsp::blas
