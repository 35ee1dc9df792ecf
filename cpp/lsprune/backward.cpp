// Backward elimination (OBS-style): start from all candidates with
// H = Gd^{-1}, W = H Bc; removing group J costs tr(W_J^T H_JJ^{-1} W_J) and
// downdates W -= H_:J H_JJ^{-1} W_J, H -= H_:J H_JJ^{-1} H_J: (docs/design.md,
// "Backward elimination").
// H is kept in its upper triangle only (rank-g SYRK downdates); removed groups
// are compacted away lazily.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>

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
  fin.timed_out = path.timed_out;
  fin.filled = std::move(path.filled);
  fin.error_path.back() = fin.error;
  return fin;
}

namespace {

// One problem's elimination state over its live candidate columns: H = Gd^{-1}
// (upper triangle) and W = H Bc, in group order; removed groups are compacted away
// lazily.
class BackwardState {
 public:
  BackwardState(Problem& P, const SelectOptions& opt)
      : grp_(P.groups()), m_(P.m()), Du_(Index(grp_.columns.size())), Dact_(Du_), gmax_(grp_.max_size()),
        wstart_(grp_.offsets.begin(), grp_.offsets.end() - 1), zero_tol_(gmax_, 0.0) {
    BackwardStart start = backward_start(P, opt);
    H_ = std::move(start.H);
    W_ = std::move(start.W);
    E = start.E;
    work_.resize(std::size_t(omp_get_max_threads()) * (gmax_ * gmax_ + gmax_ * m_));
  }

  double E;  // ridge objective of the live columns

  // cost[g] = tr(W_g^T H_gg^{-1} W_g) for the groups not in `skip`; infinite
  // where H_gg is not positive definite (cannot happen for PD H: never removed).
  void costs(const std::vector<char>& skip, std::vector<double>& cost) {
    const Index NG = grp_.size(), stride = gmax_ * gmax_ + gmax_ * m_;
#pragma omp parallel for schedule(dynamic, 4)
    for (Index g = 0; g < NG; ++g) {
      if (skip[g]) continue;
      const Index gs = grp_.size_of(g), p = wstart_[g];
      double* Mg = &work_[std::size_t(omp_get_thread_num()) * stride];
      double* T = Mg + gs * gs;
      for (Index a = 0; a < gs; ++a)
        for (Index b = 0; b < gs; ++b) Mg[a * gs + b] = h(p + a, p + b);
      if (!small::cholesky(Mg, gs, zero_tol_.data())) {
        cost[g] = std::numeric_limits<double>::infinity();
        continue;
      }
      std::memcpy(T, &W_[std::size_t(p) * m_], sizeof(double) * gs * m_);
      small::solve_lower(Mg, gs, T, m_, m_);
      cost[g] = kern::sumsq(T, gs * m_);
    }
  }

  // Removes group J: W -= H_:J H_JJ^{-1} W_J, H -= H_:J H_JJ^{-1} H_J: (rank-gJ
  // SYRK on the upper triangle); E grows by tr(W_J^T H_JJ^{-1} W_J).
  void remove(Index J, const std::vector<char>& removed) {
    const Index gJ = grp_.size_of(J), pj = wstart_[J];
    std::vector<double> MJ(gJ * gJ), Vt(std::size_t(gJ) * Dact_), Y(&W_[std::size_t(pj) * m_], &W_[std::size_t(pj) * m_] + gJ * m_);
    for (Index a = 0; a < gJ; ++a)
      for (Index b = 0; b < gJ; ++b) MJ[a * gJ + b] = h(pj + a, pj + b);
    small::cholesky(MJ.data(), gJ, zero_tol_.data());
#pragma omp parallel for schedule(static)
    for (Index p = 0; p < Dact_; ++p)
      for (Index i = 0; i < gJ; ++i) Vt[std::size_t(i) * Dact_ + p] = h(p, pj + i);
    small::solve_lower(MJ.data(), gJ, Vt.data(), Dact_, Dact_);  // Vt = MJ^{-1} H_J:
    small::solve_lower(MJ.data(), gJ, Y.data(), m_, m_);           // Y = MJ^{-1} W_J
    blas::gemm(true, false, Dact_, m_, gJ, -1.0, Vt.data(), Dact_, Y.data(), m_, 1.0, W_.data(), m_);
    blas::syrk_t(Dact_, gJ, -1.0, Vt.data(), Dact_, 1.0, H_.data(), Du_);
    E += kern::sumsq(Y.data(), gJ * m_);
    dead_ += gJ;
    if (dead_ >= 64 && dead_ * 8 >= Dact_) compact(removed);
  }

 private:
  const Groups& grp_;
  const Index m_, Du_;
  Index Dact_, gmax_, dead_ = 0;
  std::vector<Index> wstart_;
  std::vector<double> H_, W_, work_;
  const std::vector<double> zero_tol_;

  double h(Index a, Index b) const { return a <= b ? H_[std::size_t(a) * Du_ + b] : H_[std::size_t(b) * Du_ + a]; }

  // Moves the live groups' rows/columns of H (upper) and rows of W to the front, in place.
  void compact(const std::vector<char>& removed) {
    std::vector<Index> live;
    for (Index g = 0; g < grp_.size(); ++g)
      if (!removed[g]) live.push_back(g);
    std::sort(live.begin(), live.end(), [&](Index a, Index b) { return wstart_[a] < wstart_[b]; });
    std::vector<Index> newrow(Dact_, -1);
    std::vector<std::pair<Index, Index>> moves;
    Index np = 0;
    for (Index g : live) {
      moves.push_back({wstart_[g], np});
      for (Index i = 0; i < grp_.size_of(g); ++i) newrow[wstart_[g] + i] = np + i;
      np += grp_.size_of(g);
    }
    for (Index p = 0; p < Dact_; ++p) {  // rows in increasing order: sources are never overwritten early
      if (newrow[p] < 0) continue;
      double* dst = &H_[std::size_t(newrow[p]) * Du_];
      const double* src = &H_[std::size_t(p) * Du_];
      for (std::size_t q = 0; q < live.size(); ++q)
        std::memmove(dst + moves[q].second, src + moves[q].first, sizeof(double) * grp_.size_of(live[q]));
      std::memmove(&W_[std::size_t(newrow[p]) * m_], &W_[std::size_t(p) * m_], sizeof(double) * m_);
    }
    for (std::size_t q = 0; q < live.size(); ++q) wstart_[live[q]] = moves[q].second;
    Dact_ = np;
    dead_ = 0;
  }
};

// The group of least weighted cost sum_r w_r cost_r(g) among those not in `skip`
// (ties: lowest index; a cost infinite in any problem is never removed), or -1.
Index cheapest(const std::vector<std::vector<double>>& cost, const std::vector<double>& w,
               const std::vector<char>& skip) {
  Index J = -1;
  double best = 0;
  for (Index g = 0; g < Index(skip.size()); ++g) {
    if (skip[g]) continue;
    double c = 0;  // one problem with w = 1: exactly its cost
    for (std::size_t r = 0; r < w.size(); ++r) c += std::isfinite(cost[r][g]) ? w[r] * cost[r][g] : cost[r][g];
    if (std::isfinite(c) && (J < 0 || c < best)) {
      J = g;
      best = c;
    }
  }
  return J;
}

// After the time limit: removes the `n` groups of least weighted current cost at once (ties: lowest index;
// never an infinite cost), recording them in `filled` and one path entry whose error the re-fit replaces.
void remove_cheapest(const std::vector<std::vector<double>>& cost, const std::vector<double>& w,
                     std::vector<char>& skip, Index n, EliminationPath& path) {
  std::vector<std::pair<double, Index>> cand;
  for (Index g = 0; g < Index(skip.size()); ++g) {
    if (skip[g]) continue;
    double c = 0;
    for (std::size_t r = 0; r < w.size(); ++r) c += std::isfinite(cost[r][g]) ? w[r] * cost[r][g] : cost[r][g];
    if (std::isfinite(c)) cand.push_back({c, g});
  }
  std::sort(cand.begin(), cand.end());
  const Index k = std::min(n, Index(cand.size()));
  for (Index i = 0; i < k; ++i) {
    const Index g = cand[i].second;
    path.removed[g] = skip[g] = 1;
    path.order.push_back(g);
    path.filled.push_back(g);
  }
  path.timed_out = true;
  path.stopped_early = k < n;
  for (auto& e : path.error_paths) e.push_back(e.back());  // a placeholder: backward_finish sets the re-fit's error
  path.kept_path.push_back(path.kept_path.back() - k);
}

}  // namespace

SelectResult EliminationPath::path_of(std::size_t r) const {
  SelectResult res;
  res.removed = order;
  res.error_path = error_paths[r];
  res.kept_path = kept_path;
  res.stopped_early = stopped_early;
  res.timed_out = timed_out;
  res.filled = filled;
  return res;
}

EliminationPath backward_eliminate(const std::vector<Problem*>& probs, const std::vector<double>& w,
                                   const SelectOptions& opt) {
  const std::size_t R = probs.size();
  const Index NG = probs[0]->groups().size();
  std::vector<std::unique_ptr<BackwardState>> st;
  for (Problem* P : probs) st.push_back(std::make_unique<BackwardState>(*P, opt));
  EliminationPath path;
  path.removed.assign(NG, 0);
  std::vector<char> skip(NG, 0);  // removed or forced
  for (Index g : opt.force) skip[g] = 1;
  double energy = 0;  // weighted; one problem with w = 1: exactly its energy
  for (std::size_t r = 0; r < R; ++r) {
    energy += w[r] * probs[r]->energy();
    path.error_paths.push_back({st[r]->E});
  }
  path.kept_path.push_back(NG);
  Index kept = NG;
  const Index target = opt.n_keep >= 0 ? opt.n_keep : 0;
  std::vector<std::vector<double>> cost(R, std::vector<double>(NG));
  const auto start = std::chrono::steady_clock::now();
  while (kept > target) {
    for (std::size_t r = 0; r < R; ++r) st[r]->costs(skip, cost[r]);
    const Index J = cheapest(cost, w, skip);
    if (J < 0) {  // nothing removable left (all forced or numerically unusable)
      path.stopped_early = opt.n_keep >= 0;
      break;
    }
    if (out_of_time(opt, start)) {  // remove the rest at once by their current costs; the re-fit follows
      remove_cheapest(cost, w, skip, kept - target, path);
      kept = path.kept_path.back();
      break;
    }
    double after = 0;
    for (std::size_t r = 0; r < R; ++r)
      if (w[r] > 0) after += w[r] * (st[r]->E + cost[r][J]);
    if (opt.tol >= 0 && after > opt.tol * energy) break;
    path.removed[J] = skip[J] = 1;
    for (std::size_t r = 0; r < R; ++r) {
      st[r]->remove(J, path.removed);
      path.error_paths[r].push_back(st[r]->E);
    }
    path.order.push_back(J);
    path.kept_path.push_back(--kept);
  }
  return path;  // the states (and their H) are freed before any re-fit
}

SelectResult select_backward(Problem& P, const SelectOptions& opt) {
  const EliminationPath path = backward_eliminate({&P}, {1.0}, opt);
  return backward_finish(P, path.removed, path.path_of(0));
}

}  // namespace lsp
