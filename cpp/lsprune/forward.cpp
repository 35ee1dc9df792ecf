// Greedy forward selection (exact LS gain) and group simultaneous OMP, both with
// the Cholesky/Schur state of docs/design.md, "Forward selection and OMP", and no
// refactorization per step.
//
// State after selecting columns S (working positions of the candidates):
//   L L^T = Gd_SS,  C = L^{-1} Gd_{S,:}  (K x Dact),  Z = L^{-1} Bc_S,
//   R = Bc - C^T Z  (Dact x m),  Dblk_I = Gd_II - C_I^T C_I  per group.
// Adding group J: c = L_J^{-1}(Gd_{J,:} - C_J^T C), z = L_J^{-1} R_J,
//   R -= c^T z, Dblk_I -= c_I^T c_I, error -= ||z||^2.
// Columns of chosen/degenerate groups are compacted away lazily so the sweeps
// over C and R only touch live candidates.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>

#include "blas.hpp"
#include "forward_state.hpp"
#include "kernels.hpp"
#include "problem.hpp"
#include "small.hpp"

namespace lsp {
namespace {

struct ForwardState final : HostGainsState {
  Problem& P;
  const Groups& grp;
  const bool omp;
  const double rcond;
  Index NG, m, Du, Dact, K = 0, dead = 0;
  std::vector<Index> pos2col, wstart;
  std::vector<char> counted;
  std::vector<double> R, C, Lpacked, Z, Dblk, tol;
  std::vector<Index> dboff;
  std::vector<Index> sel_cols;  // columns in selection order
  std::vector<double> work;     // per-thread scratch
  Index work_stride, gJmax, chunk;

  ForwardState(Problem& p, bool omp_, double rc)
      : P(p), grp(p.groups()), omp(omp_), rcond(rc), NG(grp.size()), m(p.m()) {
    Du = Index(grp.columns.size());
    Dact = Du;
    pos2col = grp.columns;
    wstart.assign(grp.offsets.begin(), grp.offsets.end() - 1);
    state.assign(NG, ACTIVE);
    counted.assign(NG, 0);
    gain.assign(NG, 0.0);
    R.resize(std::size_t(Du) * m);
    for (Index p = 0; p < Du; ++p) std::memcpy(&R[std::size_t(p) * m], P.cross_row(pos2col[p]), sizeof(double) * m);
    dboff.resize(NG + 1, 0);
    for (Index g = 0; g < NG; ++g) dboff[g + 1] = dboff[g] + grp.size_of(g) * grp.size_of(g);
    Dblk.resize(dboff[NG]);
    tol.resize(Du);
#pragma omp parallel for schedule(dynamic, 8)
    for (Index g = 0; g < NG; ++g) {
      const Index gs = grp.size_of(g), o = grp.offsets[g];
      for (Index i = 0; i < gs; ++i) {
        P.gram_row(grp.columns[o + i], &grp.columns[o], gs, &Dblk[dboff[g] + i * gs]);
        // Degeneracy threshold: relative to the column's own damped variance, and
        // absolute against exactly-dead columns when damping is 0.
        double v = P.gram_diag(grp.columns[o + i]);
        tol[o + i] = std::max(rcond * v, 0.0);
      }
    }
    Index gmax = grp.max_size();
    gJmax = gmax;
    work_stride = gmax * gmax * 2 + gmax * m;
    work.resize(std::size_t(omp_get_max_threads()) * work_stride);
    // Enough groups per scheduling grab that single-column layers are not
    // dominated by the work-queue traffic.
    chunk = std::max<Index>(1, std::min<Index>(64, NG / (16 * omp_get_max_threads())));
  }

  // One live group's share of a step: downdate its residual block and R rows by
  // the new rows (c, z) of the chosen group (gJ = 0 at the start), then its gain
  // (or mark it degenerate). buf: per-thread scratch.
  void evaluate(Index g, double* buf, const double* c, Index ldc, Index gJ, const double* z) {
    const Index gs = grp.size_of(g), p = wstart[g];
    double* Db = &Dblk[dboff[g]];
    if (gs == 1) {  // single columns (Linear layers): no block algebra, little per-group overhead
      double* r = &R[std::size_t(p) * m];
      double s = 0;
      for (Index i = 0; i < gJ; ++i) {
        buf[i] = c[i * ldc + p];
        s += buf[i] * buf[i];
      }
      const double d = (Db[0] -= s);
      if (!(d > tol[grp.offsets[g]]) || !std::isfinite(d)) {
        state[g] = DEGENERATE;
        return;
      }
      double v = 0;
      if (m <= 16) {
        for (Index k = 0; k < m; ++k) {
          double x = r[k];
          for (Index i = 0; i < gJ; ++i) x -= buf[i] * z[i * m + k];
          r[k] = x;
          v += x * x;
        }
      } else {
        v = kern::update_gain(r, 1, buf, gJ, z, m, nullptr, false, buf + gJmax);
      }
      gain[g] = omp ? v : v / d;
      if (!std::isfinite(gain[g])) state[g] = DEGENERATE;
      return;
    }
    double* cc = buf;               // gs x gJ coefficients of group g in c
    double* Lg = cc + gs * gJmax;   // gs x gs
    double* T = Lg + gs * gs;       // gs x m
    for (Index a = 0; a < gs; ++a)
      for (Index i = 0; i < gJ; ++i) cc[a * gJ + i] = c[i * ldc + p + a];
    for (Index a = 0; a < gs; ++a)
      for (Index b = 0; b <= a; ++b) {
        double s = 0;
        for (Index i = 0; i < gJ; ++i) s += cc[a * gJ + i] * cc[b * gJ + i];
        Db[a * gs + b] -= s;
        if (b != a) Db[b * gs + a] = Db[a * gs + b];
      }
    std::memcpy(Lg, Db, sizeof(double) * gs * gs);
    if (!small::cholesky(Lg, gs, &tol[grp.offsets[g]])) {
      state[g] = DEGENERATE;
      return;
    }
    double v = kern::update_gain(&R[std::size_t(p) * m], gs, cc, gJ, z, m, Lg, !omp, T);
    if (!std::isfinite(v)) state[g] = DEGENERATE;
    gain[g] = v;
  }

  void evaluate_all() override {
#pragma omp parallel for schedule(dynamic, chunk)
    for (Index g = 0; g < NG; ++g)
      if (state[g] == ACTIVE) evaluate(g, &work[std::size_t(omp_get_thread_num()) * work_stride], nullptr, 0, 0, nullptr);
    count_degenerate();
  }

  // Newly degenerate groups' positions are dead (compacted away later).
  void count_degenerate() {
    for (Index g = 0; g < NG; ++g)
      if (state[g] == DEGENERATE && !counted[g]) {
        counted[g] = 1;
        dead += grp.size_of(g);
      }
  }

  void release() override {
    for (std::vector<double>* v : {&R, &C, &Lpacked, &Z, &Dblk, &work}) std::vector<double>().swap(*v);
  }
  void after_step() override { maybe_compact(); }
  Index selected_columns() const override { return K; }
  void reserve(Index cap) override {
    C.reserve(std::size_t(cap) * Du);
    Z.reserve(std::size_t(cap) * m);
    Lpacked.reserve(std::size_t(cap) * (cap + 1) / 2);
  }
  void factors(std::vector<Index>& cols, std::vector<double>& L, std::vector<double>& Zout) override {
    cols = sel_cols;
    L.assign(std::size_t(K) * K, 0.0);
    std::size_t q = 0;
    for (Index i = 0; i < K; ++i)
      for (Index k = 0; k <= i; ++k) L[std::size_t(i) * K + k] = Lpacked[q++];
    Zout = Z;
  }
  // Adds group J (which must be ACTIVE and non-degenerate); returns ||z||^2.
  double add(Index J) override {
    const Index gJ = grp.size_of(J), pj = wstart[J], o = grp.offsets[J];
    std::vector<double> LJ(&Dblk[dboff[J]], &Dblk[dboff[J]] + gJ * gJ);
    if (!small::cholesky(LJ.data(), gJ, &tol[o])) throw NumericalError("internal: chosen group is singular");
    // A = C[:, J] (K x gJ); c = LJ^{-1}(Gd_{J,act} - A^T C).
    std::vector<double> A(std::size_t(K) * gJ);
    for (Index k = 0; k < K; ++k)
      for (Index i = 0; i < gJ; ++i) A[k * gJ + i] = C[std::size_t(k) * Du + pj + i];
    std::vector<double> c(std::size_t(gJ) * Dact);
    kern::at_c(A.data(), K, gJ, C.data(), Du, Dact, c.data(), Dact);
    std::vector<double> row(Dact);
    for (Index i = 0; i < gJ; ++i) {
      P.gram_row(grp.columns[o + i], pos2col.data(), Dact, row.data());
      double* ci = &c[std::size_t(i) * Dact];
      for (Index p = 0; p < Dact; ++p) ci[p] = row[p] - ci[p];
    }
    small::solve_lower(LJ.data(), gJ, c.data(), Dact, Dact);
    std::vector<double> z(&R[std::size_t(pj) * m], &R[std::size_t(pj) * m] + gJ * m);
    small::solve_lower(LJ.data(), gJ, z.data(), m, m);

    // Grow C, Z and the packed L by gJ rows.
    C.resize(std::size_t(K + gJ) * Du);
    for (Index i = 0; i < gJ; ++i)
      std::memcpy(&C[std::size_t(K + i) * Du], &c[std::size_t(i) * Dact], sizeof(double) * Dact);
    Z.insert(Z.end(), z.begin(), z.end());
    for (Index i = 0; i < gJ; ++i) {
      for (Index k = 0; k < K; ++k) Lpacked.push_back(A[k * gJ + i]);
      for (Index k = 0; k <= i; ++k) Lpacked.push_back(LJ[i * gJ + k]);
      sel_cols.push_back(grp.columns[o + i]);
    }
    K += gJ;
    state[J] = CHOSEN;
    dead += gJ;

    // Fused sweep: rank-gJ downdate of every live group's R rows and residual
    // block, then its new gain. Small steps stay on one thread (waking the team
    // costs more than the work).
    const bool team = Dact * gJ * (m + gJmax) > 200000;
#pragma omp parallel for schedule(dynamic, chunk) if (team)
    for (Index g = 0; g < NG; ++g)
      if (state[g] == ACTIVE)
        evaluate(g, &work[std::size_t(omp_get_thread_num()) * work_stride], c.data(), Dact, gJ, z.data());
    count_degenerate();
    return kern::sumsq(z.data(), gJ * m);
  }

  // Moves live groups' columns to the front (stable, in place) once enough
  // positions are dead; C rows, R rows and pos2col follow.
  void maybe_compact() {
    if (dead < 64 || dead * 8 < Dact) return;
    std::vector<std::pair<Index, Index>> moves;  // (old, new) start, group order by position
    std::vector<Index> live;
    for (Index g = 0; g < NG; ++g)
      if (state[g] == ACTIVE) live.push_back(g);
    std::sort(live.begin(), live.end(), [&](Index a, Index b) { return wstart[a] < wstart[b]; });
    Index np = 0;
    for (Index g : live) {
      moves.push_back({wstart[g], np});
      wstart[g] = np;
      np += grp.size_of(g);
    }
#pragma omp parallel for schedule(static)
    for (Index k = 0; k < K; ++k) {
      double* row = &C[std::size_t(k) * Du];
      for (std::size_t q = 0; q < live.size(); ++q)
        std::memmove(row + moves[q].second, row + moves[q].first, sizeof(double) * grp.size_of(live[q]));
    }
    for (std::size_t q = 0; q < live.size(); ++q) {
      const Index gs = grp.size_of(live[q]);
      std::memmove(&R[std::size_t(moves[q].second) * m], &R[std::size_t(moves[q].first) * m],
                   sizeof(double) * gs * m);
      std::memmove(&pos2col[moves[q].second], &pos2col[moves[q].first], sizeof(Index) * gs);
    }
    Dact = np;
    dead = 0;
  }
};

}  // namespace

std::unique_ptr<ForwardStateBase> make_forward_state(Problem& P, bool omp, double rcond) {
  return std::make_unique<ForwardState>(P, omp, rcond);
}

Index largest_columns(const Groups& grp, Index n) {
  std::vector<Index> sizes;
  for (Index g = 0; g < grp.size(); ++g) sizes.push_back(grp.size_of(g));
  std::sort(sizes.rbegin(), sizes.rend());
  Index cap = 0;
  for (Index i = 0; i < std::min(n, Index(sizes.size())); ++i) cap += sizes[i];
  return cap;
}

std::unique_ptr<ForwardStateBase> make_cpu_forward_state(Problem& P, const SelectOptions& opt) {
  const bool omp = opt.method == Method::Omp;
  const Groups& grp = P.groups();
  const Index Du = Index(grp.columns.size());
  const Index K = opt.n_keep >= 0 ? largest_columns(grp, opt.n_keep) : Du;
  const Index g = grp.size() > 0 ? (Du + grp.size() - 1) / grp.size() : 1;  // columns per group, rounded up
  if (opt.update == Update::LowRank ||
      (opt.update == Update::Auto && lowrank_forward_pays(Du, P.m(), K, g, lowrank_rank_bound(P)))) {
    if (auto S = make_lowrank_forward_state(P, omp, opt.rcond)) return S;
    if (opt.update == Update::LowRank)
      throw std::invalid_argument(
          "update='lowrank' needs damping > 0 and a Gram and cross of the same calibration rows (a pivoted "
          "Cholesky of rank at most the number of rows must represent them to rounding)");
  }
  const bool blocked =
      opt.update == Update::Blocked || (opt.update == Update::Auto && blocked_forward_pays(Du, P.m(), K, g));
  if (blocked) return make_blocked_forward_state(P, omp, opt.rcond);
  return make_forward_state(P, omp, opt.rcond);
}

SelectResult select_forward(Problem& P, const SelectOptions& opt) {
  auto S = make_cpu_forward_state(P, opt);
  return run_forward(P, opt, *S);
}

namespace {

// After the time limit: the greedy prefix `res.selected`, then the active groups of largest current
// criterion up to `target` (forward: the exact error drop given the prefix; omp: ||R_g||^2; a state
// without host gains: the group's damped variance), re-fitted together. Ties go to the lowest index.
SelectResult fill_after_time_limit(Problem& P, ForwardStateBase& S, Index target, SelectResult&& res) {
  const Groups& grp = P.groups();
  std::vector<std::pair<double, Index>> cand;
  for (Index g = 0; g < grp.size(); ++g) {
    if (!S.is_active(g)) continue;
    double score = 0;
    if (S.has_host_gains()) {
      score = S.gain_of(g);
    } else {
      for (Index k = grp.offsets[g]; k < grp.offsets[g + 1]; ++k) score += P.gram_diag(grp.columns[k]);
    }
    cand.push_back({-score, g});
  }
  std::sort(cand.begin(), cand.end());
  std::vector<Index> keep = res.selected;
  for (std::size_t i = 0; i < cand.size() && Index(keep.size()) < target; ++i) {
    keep.push_back(cand[i].second);
    res.filled.push_back(cand[i].second);
  }
  S.release();  // the re-fit's K x K factor must not come on top of the state
  SelectResult fin = refit(P, keep);
  fin.selected = keep;  // the greedy prefix in its order, then the filled groups by criterion
  fin.filled = std::move(res.filled);
  fin.error_path = std::move(res.error_path);
  P.to_caller_units(fin.error_path, 2, 0);  // the prefix is in working units; refit's result is not
  fin.error_path.push_back(fin.error);
  fin.kept_path = std::move(res.kept_path);
  fin.kept_path.push_back(Index(keep.size()));
  fin.skipped = std::move(res.skipped);
  fin.timed_out = true;
  fin.stopped_early = Index(keep.size()) < target;
  return fin;
}

}  // namespace

SelectResult run_forward(Problem& P, const SelectOptions& opt, ForwardStateBase& S) {
  const auto start = std::chrono::steady_clock::now();
  const Groups& grp = P.groups();
  const Index NG = grp.size();
  if (opt.n_keep >= 0) S.reserve(largest_columns(grp, opt.n_keep));  // room for the largest possible kept set
  SelectResult res;
  const double energy = P.energy();
  double E = energy;
  res.error_path.push_back(E);
  res.kept_path.push_back(0);
  const Index target = opt.n_keep >= 0 ? opt.n_keep : NG;
  auto done = [&]() {
    if (Index(res.selected.size()) >= target) return true;
    return opt.tol >= 0 && E <= opt.tol * energy;
  };
  auto take = [&](Index J) {
    E -= S.add(J);
    E = std::max(E, 0.0);
    res.selected.push_back(J);
    res.error_path.push_back(E);
    res.kept_path.push_back(Index(res.selected.size()));
    S.after_step();
  };

  S.evaluate_all();
  for (Index J : opt.force)  // kept whatever their gain; degenerate ones are reported in skipped
    if (S.is_active(J)) take(J);
  while (!done()) {
    if (out_of_time(opt, start)) {
      res.timed_out = true;
      break;
    }
    Index J = S.best();
    if (J < 0) {
      res.stopped_early = opt.n_keep >= 0;
      break;
    }
    take(J);
  }
  res.skipped = S.degenerate();
  if (res.timed_out) return fill_after_time_limit(P, S, target, std::move(res));
  finish_forward(P, S, {}, E, res);
  return res;
}

void ForwardStateBase::weights(std::vector<Index>& cols, std::vector<double>& Wt) {
  std::vector<double> L;
  factors(cols, L, Wt);
  const Index K = Index(cols.size());
  const Index m = K > 0 ? Index(Wt.size()) / K : 0;
  if (K > 0) blas::trsm_lower_t(K, m, L.data(), K, Wt.data(), m);
}

void finish_forward(Problem& P, ForwardStateBase& S, const std::vector<Index>& zero_cols, double E,
                    SelectResult& res) {
  // W^T on the chosen columns (selection order); finish() sorts them.
  std::vector<Index> cols;
  std::vector<double> Wt;
  S.weights(cols, Wt);
  cols.insert(cols.end(), zero_cols.begin(), zero_cols.end());
  Wt.resize(std::size_t(cols.size()) * P.m(), 0.0);
  P.finish(cols, Wt, E, res);
}

}  // namespace lsp
