// Thin wrappers over the OpenBLAS/LAPACK of the scipy-openblas32 wheel (symbols
// carry a scipy_ prefix). Row-major everywhere; sizes are checked to fit the
// 32-bit BLAS integer.
#pragma once

#include "common.hpp"

namespace lsp::blas {

// C(upper) = alpha * A^T A + beta * C, A is k x n row-major with leading dim lda.
void syrk_t(Index n, Index k, float alpha, const float* A, Index lda, float beta, float* C, Index ldc);
void syrk_t(Index n, Index k, double alpha, const double* A, Index lda, double beta, double* C, Index ldc);
// C(upper) = alpha * A A^T + beta * C, A is n x k row-major.
void syrk_n(Index n, Index k, float alpha, const float* A, Index lda, float beta, float* C, Index ldc);
void syrk_n(Index n, Index k, double alpha, const double* A, Index lda, double beta, double* C, Index ldc);

// C(upper) = alpha * (A^T B + B^T A) + beta * C, A and B are k x n row-major.
void syr2k_t(Index n, Index k, double alpha, const double* A, Index lda, const double* B, Index ldb, double beta,
             double* C, Index ldc);
// y = alpha * A^T x + beta * y, A is k x n row-major (x: k, y: n).
void gemv_t(Index k, Index n, double alpha, const double* A, Index lda, const double* x, double beta, double* y);

// C = alpha * op(A) op(B) + beta * C, row-major.
void gemm(bool ta, bool tb, Index m, Index n, Index k, float alpha, const float* A, Index lda, const float* B,
          Index ldb, float beta, float* C, Index ldc);
void gemm(bool ta, bool tb, Index m, Index n, Index k, double alpha, const double* A, Index lda, const double* B,
          Index ldb, double beta, double* C, Index ldc);

// Cholesky of the upper triangle of a row-major symmetric matrix, in place:
// afterwards A(upper) = U with U^T U = A. Returns 0 on success or the LAPACK info
// (> 0: leading minor not positive definite).
int potrf_upper(Index n, double* A, Index lda);
// potrf_upper that also refuses a numerically singular matrix: a pivot U_ii^2
// below rcond * A_ii counts as a failure (returns i + 1), so later solves with
// the factor stay well conditioned.
int potrf_upper_checked(Index n, double* A, Index lda, double rcond);
// Inverse from the Cholesky factor: A(upper) = (U^T U)^{-1}.
int potri_upper(Index n, double* A, Index lda);
// Solve U^T X = B (lower-triangular solve with the transposed factor), B is n x nrhs row-major.
void trsm_upper_t(Index n, Index nrhs, const double* U, Index ldu, double* B, Index ldb);
// Solve U X = B.
void trsm_upper_n(Index n, Index nrhs, const double* U, Index ldu, double* B, Index ldb);
// Solve L^T X = B with L lower triangular (row-major), B is n x nrhs.
void trsm_lower_t(Index n, Index nrhs, const double* L, Index ldl, double* B, Index ldb);

// Eigen-decomposition of a symmetric n x n matrix (row-major, full): eigenvalues
// ascending into w; on return row i of A holds the eigenvector of w[i].
int syevd(Index n, double* A, Index lda, double* w);

int num_threads();
void set_num_threads(int n);

}  // namespace lsp::blas
