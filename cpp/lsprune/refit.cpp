// Least-squares re-fit of a layer on a given set of kept groups (also the final
// step of backward elimination and of the magnitude/random baselines).
#include <algorithm>
#include <cstring>

#include "blas.hpp"
#include "problem.hpp"

namespace lsp {

SelectResult refit(Problem& P, const std::vector<Index>& keep_groups) {
  const Groups& grp = P.groups();
  const Index m = P.m();
  std::vector<Index> cols;
  for (Index g : keep_groups) {
    if (g < 0 || g >= grp.size()) throw std::invalid_argument("kept group index out of range");
    for (Index k = grp.offsets[g]; k < grp.offsets[g + 1]; ++k) cols.push_back(grp.columns[k]);
  }
  std::sort(cols.begin(), cols.end());
  if (std::adjacent_find(cols.begin(), cols.end()) != cols.end())
    throw std::invalid_argument("a kept group is listed twice");
  const Index K = Index(cols.size());
  SelectResult res;
  std::vector<double> Wt(std::size_t(K) * m);
  double E = P.energy();
  if (K > 0) {
    std::vector<double> A(std::size_t(K) * K);
    auto build = [&]() {
#pragma omp parallel for schedule(static)
      for (Index i = 0; i < K; ++i) P.gram_row(cols[i], cols.data(), K, &A[std::size_t(i) * K]);
    };
    // A singular kept set (dead or duplicated channels) raises the damping.
    factor_or_raise_damping(P, [&]() { build(); return blas::potrf_upper_checked(K, A.data(), K, 1e-10); },
                            "the kept columns' Gram matrix");
    for (Index i = 0; i < K; ++i) std::memcpy(&Wt[std::size_t(i) * m], P.cross_row(cols[i]), sizeof(double) * m);
    // Gd = U^T U: E = energy - ||U^{-T} Bc_S||^2, W^T = U^{-1} (U^{-T} Bc_S).
    blas::trsm_upper_t(K, m, A.data(), K, Wt.data(), m);
    double fit = 0;
    for (double v : Wt) fit += v * v;
    E -= fit;
    blas::trsm_upper_n(K, m, A.data(), K, Wt.data(), m);
  }
  res.selected.assign(keep_groups.begin(), keep_groups.end());
  std::sort(res.selected.begin(), res.selected.end());
  res.error_path = {std::max(E, 0.0)};
  res.kept_path = {Index(res.selected.size())};
  P.finish(cols, Wt, E, res);
  return res;
}

}  // namespace lsp
