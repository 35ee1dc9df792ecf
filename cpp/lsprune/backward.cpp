// Backward elimination (OBS-style): start from all candidates with
// H = Gd^{-1}, W = H Bc; removing group J costs tr(W_J^T H_JJ^{-1} W_J) and
// downdates W -= H_:J H_JJ^{-1} W_J, H -= H_:J H_JJ^{-1} H_J: (docs/design.md,
// "Backward elimination").
// H is kept in its upper triangle only (rank-g SYRK downdates); removed groups
// are compacted away lazily.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "blas.hpp"
#include "kernels.hpp"
#include "problem.hpp"
#include "small.hpp"

namespace lsp {

BackwardStart backward_start(Problem& P, const SelectOptions& opt) {
  const Groups& grp = P.groups();
  const Index m = P.m(), Du = Index(grp.columns.size());
  const std::vector<Index>& pos2col = grp.columns;
  BackwardStart st;
  // H = (Gd_UU)^{-1}; a singular system raises the damping step by step.
  std::vector<double>& H = st.H;
  H.resize(std::size_t(Du) * Du);
  auto build = [&]() {
#pragma omp parallel for schedule(static)
    for (Index p = 0; p < Du; ++p) P.gram_row(pos2col[p], pos2col.data(), Du, &H[std::size_t(p) * Du]);
  };
  factor_or_raise_damping(P, [&]() { build(); return blas::potrf_upper_checked(Du, H.data(), Du, opt.rcond); }, "the Gram matrix");
  if (blas::potri_upper(Du, H.data(), Du) != 0) throw NumericalError("inverting the Gram matrix failed");
#pragma omp parallel for schedule(dynamic, 16)
  for (Index i = 0; i < Du; ++i)
    for (Index j = i + 1; j < Du; ++j) H[std::size_t(j) * Du + i] = H[std::size_t(i) * Du + j];
  std::vector<double> Bc(std::size_t(Du) * m);
  st.W.resize(std::size_t(Du) * m);
  for (Index p = 0; p < Du; ++p) std::memcpy(&Bc[std::size_t(p) * m], P.cross_row(pos2col[p]), sizeof(double) * m);
  blas::gemm(false, false, Du, m, Du, 1.0, H.data(), Du, Bc.data(), m, 0.0, st.W.data(), m);
  double fit = 0;
  for (std::size_t k = 0; k < Bc.size(); ++k) fit += Bc[k] * st.W[k];
  st.E = std::max(P.energy() - fit, 0.0);
  return st;
}

SelectResult backward_finish(Problem& P, const std::vector<char>& removed, SelectResult&& path) {
  // Final weights from a fresh solve on the kept set (no drift from downdates).
  std::vector<Index> keep;
  for (Index g = 0; g < Index(removed.size()); ++g)
    if (!removed[g]) keep.push_back(g);
  SelectResult fin = refit(P, keep);
  fin.selected = keep;
  fin.removed = std::move(path.removed);
  fin.error_path = std::move(path.error_path);
  P.to_caller_units(fin.error_path, 2, 0);  // the path is in working units; refit's result is not
  fin.kept_path = std::move(path.kept_path);
  fin.stopped_early = path.stopped_early;
  fin.error_path.back() = fin.error;
  return fin;
}

SelectResult select_backward(Problem& P, const SelectOptions& opt) {
  const Groups& grp = P.groups();
  const Index NG = grp.size(), m = P.m(), Du = Index(grp.columns.size());
  std::vector<Index> pos2col(grp.columns), wstart(grp.offsets.begin(), grp.offsets.end() - 1);
  std::vector<char> removed(NG, 0), forced(NG, 0);
  for (Index g : opt.force) forced[g] = 1;

  BackwardStart start = backward_start(P, opt);
  std::vector<double>& H = start.H;
  std::vector<double>& W = start.W;
  double E = start.E;
  const double energy = P.energy();
  SelectResult res;
  res.error_path.push_back(E);
  res.kept_path.push_back(NG);
  Index kept = NG, Dact = Du, dead = 0;
  const Index target = opt.n_keep >= 0 ? opt.n_keep : 0;
  const Index gmax = grp.max_size();
  std::vector<double> cost(NG), work(std::size_t(omp_get_max_threads()) * (gmax * gmax + gmax * m));
  const std::vector<double> zero_tol(gmax, 0.0);
  // Upper-triangle read of H.
  auto h = [&](Index a, Index b) { return a <= b ? H[std::size_t(a) * Du + b] : H[std::size_t(b) * Du + a]; };

  while (kept > target) {
#pragma omp parallel for schedule(dynamic, 4)
    for (Index g = 0; g < NG; ++g) {
      if (removed[g] || forced[g]) continue;
      const Index gs = grp.size_of(g), p = wstart[g];
      double* Mg = &work[std::size_t(omp_get_thread_num()) * (gmax * gmax + gmax * m)];
      double* T = Mg + gs * gs;
      for (Index a = 0; a < gs; ++a)
        for (Index b = 0; b < gs; ++b) Mg[a * gs + b] = h(p + a, p + b);
      if (!small::cholesky(Mg, gs, zero_tol.data())) {  // cannot happen for PD H; never remove it
        cost[g] = std::numeric_limits<double>::infinity();
        continue;
      }
      std::memcpy(T, &W[std::size_t(p) * m], sizeof(double) * gs * m);
      small::solve_lower(Mg, gs, T, m, m);
      cost[g] = kern::sumsq(T, gs * m);
    }
    Index J = -1;
    for (Index g = 0; g < NG; ++g)
      if (!removed[g] && !forced[g] && std::isfinite(cost[g]) && (J < 0 || cost[g] < cost[J])) J = g;
    if (J < 0) {  // nothing removable left (all forced or numerically unusable)
      res.stopped_early = opt.n_keep >= 0;
      break;
    }
    if (opt.tol >= 0 && E + cost[J] > opt.tol * energy) break;

    const Index gJ = grp.size_of(J), pj = wstart[J];
    std::vector<double> MJ(gJ * gJ), Vt(std::size_t(gJ) * Dact), Y(&W[std::size_t(pj) * m], &W[std::size_t(pj) * m] + gJ * m);
    for (Index a = 0; a < gJ; ++a)
      for (Index b = 0; b < gJ; ++b) MJ[a * gJ + b] = h(pj + a, pj + b);
    small::cholesky(MJ.data(), gJ, zero_tol.data());
#pragma omp parallel for schedule(static)
    for (Index p = 0; p < Dact; ++p)
      for (Index i = 0; i < gJ; ++i) Vt[std::size_t(i) * Dact + p] = h(p, pj + i);
    small::solve_lower(MJ.data(), gJ, Vt.data(), Dact, Dact);  // Vt = MJ^{-1} H_J:
    small::solve_lower(MJ.data(), gJ, Y.data(), m, m);          // Y = MJ^{-1} W_J
    blas::gemm(true, false, Dact, m, gJ, -1.0, Vt.data(), Dact, Y.data(), m, 1.0, W.data(), m);
    blas::syrk_t(Dact, gJ, -1.0, Vt.data(), Dact, 1.0, H.data(), Du);
    E += kern::sumsq(Y.data(), gJ * m);
    removed[J] = 1;
    --kept;
    res.removed.push_back(J);
    res.error_path.push_back(E);
    res.kept_path.push_back(kept);
    dead += gJ;

    if (dead >= 64 && dead * 8 >= Dact) {  // compact H (upper), W and positions in place
      std::vector<Index> live;
      for (Index g = 0; g < NG; ++g)
        if (!removed[g]) live.push_back(g);
      std::sort(live.begin(), live.end(), [&](Index a, Index b) { return wstart[a] < wstart[b]; });
      std::vector<Index> newrow(Dact, -1);
      Index np = 0;
      std::vector<std::pair<Index, Index>> moves;
      for (Index g : live) {
        moves.push_back({wstart[g], np});
        for (Index i = 0; i < grp.size_of(g); ++i) newrow[wstart[g] + i] = np + i;
        np += grp.size_of(g);
      }
      for (Index p = 0; p < Dact; ++p) {  // rows in increasing order: sources are never overwritten early
        if (newrow[p] < 0) continue;
        double* dst = &H[std::size_t(newrow[p]) * Du];
        const double* src = &H[std::size_t(p) * Du];
        for (std::size_t q = 0; q < live.size(); ++q)
          std::memmove(dst + moves[q].second, src + moves[q].first, sizeof(double) * grp.size_of(live[q]));
        std::memmove(&W[std::size_t(newrow[p]) * m], &W[std::size_t(p) * m], sizeof(double) * m);
      }
      for (std::size_t q = 0; q < live.size(); ++q) {
        std::memmove(&pos2col[moves[q].second], &pos2col[moves[q].first], sizeof(Index) * grp.size_of(live[q]));
        wstart[live[q]] = moves[q].second;
      }
      Dact = np;
      dead = 0;
    }
  }
  H.clear();
  H.shrink_to_fit();
  return backward_finish(P, removed, std::move(res));
}

}  // namespace lsp
