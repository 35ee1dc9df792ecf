#include "factorize.hpp"

#include <algorithm>
#include <cstring>

#include "blas.hpp"

namespace lsp {

FactorizeResult factorize(Problem& P, Index rank, double tol) {
  const Index D = P.D(), m = P.m(), rmax = std::min(D, m);
  if (rank > rmax) throw std::invalid_argument("rank is larger than min(n_features, n_targets)");
  std::vector<Index> all(D);
  for (Index j = 0; j < D; ++j) all[j] = j;

  // Gd = U^T U (a singular Gram raises the damping, as refit does).
  std::vector<double> A(std::size_t(D) * D);
  auto build = [&]() {
#pragma omp parallel for schedule(static)
    for (Index i = 0; i < D; ++i) P.gram_row(i, all.data(), D, &A[std::size_t(i) * D]);
  };
  factor_or_raise_damping(P, [&]() { build(); return blas::potrf_upper_checked(D, A.data(), D, 1e-10); }, "the Gram matrix");
  // T = U^{-T} Bc (D x m);  M = T^T T (m x m);  W*^T = U^{-1} T.
  std::vector<double> T(std::size_t(D) * m);
  for (Index i = 0; i < D; ++i) std::memcpy(&T[std::size_t(i) * m], P.cross_row(i), sizeof(double) * m);
  blas::trsm_upper_t(D, m, A.data(), D, T.data(), m);
  std::vector<double> M(std::size_t(m) * m), w(m);
  blas::gemm(true, false, m, m, D, 1.0, T.data(), m, T.data(), m, 0.0, M.data(), m);
  if (blas::syevd(m, M.data(), m, w.data()) != 0) throw NumericalError("eigen-decomposition failed");
  blas::trsm_upper_n(D, m, A.data(), D, T.data(), m);  // T now holds W*^T (D x m)

  FactorizeResult res;
  res.energy = P.energy();
  res.damping = P.damping();
  res.lambda = P.lambda();
  double E = res.energy;
  res.error_path.push_back(E);
  for (Index r = 0; r < rmax; ++r) {  // eigenvalues ascending: take from the back
    E -= std::max(w[m - 1 - r], 0.0);
    res.error_path.push_back(std::max(E, 0.0));
  }
  if (rank < 0) {
    rank = rmax;
    for (Index r = 0; r <= rmax; ++r)
      if (res.error_path[r] <= tol * res.energy) { rank = r; break; }
  }
  res.rank = rank;
  // U: top eigenvectors as columns (row i of M is the eigenvector of w[i]).
  res.U.assign(std::size_t(m) * rank, 0.0);
  for (Index r = 0; r < rank; ++r)
    for (Index k = 0; k < m; ++k) res.U[std::size_t(k) * rank + r] = M[std::size_t(m - 1 - r) * m + k];
  // V = U^T W* (rank x D) = (W*^T U)^T.
  std::vector<double> Vt(std::size_t(D) * rank);
  blas::gemm(false, false, D, rank, m, 1.0, T.data(), m, res.U.data(), rank, 0.0, Vt.data(), rank);
  res.V.assign(std::size_t(rank) * D, 0.0);
  for (Index i = 0; i < D; ++i)
    for (Index r = 0; r < rank; ++r) res.V[std::size_t(r) * D + i] = Vt[std::size_t(i) * rank + r];
  res.bias = P.intercept(res.U, res.V, rank);
  // Back to the caller's units (U is orthonormal, unitless): V maps x to y, the rest as in finish().
  P.to_caller_units(res.V, 1, -1);
  P.to_caller_units(res.bias, 1, 0);
  P.to_caller_units(res.error_path, 2, 0);
  res.energy = P.errors_to_caller(res.energy);
  res.lambda = P.to_caller_ridge(res.lambda);
  return res;
}

}  // namespace lsp
