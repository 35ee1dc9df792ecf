// Hot loops of the greedy solvers. Each is compiled for several instruction
// sets (AVX-512, AVX2, baseline) and picked at run time, so a portable wheel
// still runs at full speed. Results per output element do not depend on the
// instruction set's thread partition (fixed summation order), which keeps the
// greedy choice deterministic.
#pragma once

#include "common.hpp"

namespace lsp::kern {

// out (g x n, leading dim ldo) = A^T C[:, 0:n], where A is K x g (contiguous)
// and C has K rows of stride ldc. Multithreaded over column blocks.
void at_c(const double* A, Index K, Index g, const double* C, Index ldc, Index n, double* out, Index ldo);

// R (rows x m, stride ldr) -= c^T z, with c: gz x rows (stride ldc), z: gz x m.
void sub_ct_z(double* R, Index ldr, Index rows, const double* c, Index ldc, Index gz, const double* z, Index m);

// Solves L X = B in place (L lower g x g row-major, B g x n) and returns ||X||_F^2.
double lower_solve_sumsq(const double* L, Index g, double* B, Index n);

// One live group's share of a forward/omp step: R_I (gs x m) -= cc^T-weighted
// rows of z, i.e. R_I[a, :] -= sum_i cc[a * gJ + i] z[i, :]; then returns
// ||L^{-1} R_I||_F^2 when `solve` (L: gs x gs lower Cholesky factor) or
// ||R_I||_F^2. `work` needs gs * m doubles (used only for gs > 9).
double update_gain(double* R, Index gs, const double* cc, Index gJ, const double* z, Index m, const double* L,
                   bool solve, double* work);

// s[j] += x[r, j], q[j] += x[r, j]^2 over rows r of a row-major float/double
// block (row stride rs); the accumulators are float64.
void colsum_rows(const float* x, Index rows, Index rs, Index D, double* s, double* q);
void colsum_rows(const double* x, Index rows, Index rs, Index D, double* s, double* q);

// Sum of squares of n values.
double sumsq(const double* x, Index n);

// y[0:n] -= a * x[0:n]
void axpy_neg(double a, const double* x, double* y, Index n);

}  // namespace lsp::kern
