// Forward selection / OMP for statistics of few rows (docs/design.md, "Few calibration rows").
//
// n calibration rows give a centred Gram of rank r <= n - 1 (n without an intercept). A pivoted
// Cholesky writes it exactly (to rounding) as Gc = L^T L over the candidate columns (L: r x Du), and
// the cross as Bc = L^T T (T: r x m). With the ridge lambda > 0 and A_S = L_S L_S^T (r x r), the
// push-through identity gives the ridge objective of a kept set S as
//   E(S) = energy - tr(Mt) + lambda tr(Mt (A_S + lambda I)^{-1}),   Mt = T T^T,
// so the whole greedy path lives in r dimensions and m drops out (T' with T' T'^T = Mt stands in
// for T). Kept per candidate position p (rows of Du x r matrices):
//   l_p (column p of L),  u_p = (A_S + lambda I)^{-1} l_p,  R_p = lambda T'^T u_p (the residual cross).
// For a live group J the residual Gram block is S_JJ = lambda N_J, N_J = I + L_J^T U_J (g x g), so
//   forward gain = ||chol(S_JJ)^{-1} R_J||^2,   omp criterion = ||R_J||^2,
// exactly the quantities of the residual state (forward.cpp). Adding J is a Woodbury step on
// (A_S + lambda I)^{-1}: u_p -= Phi l_p, R_p -= Psi l_p with Phi = lambda U_J S_JJ^{-1} U_J^T (r x r),
// Psi = lambda R_J^T S_JJ^{-1} U_J^T: O(Du r (r + rc)) per step (single columns: O(Du (r + rc))).
// The re-fit is W_S^T = U_S^T T (K x m). Cost: O(Du r^2) for the factor, O(K Du r) for the path,
// against O(K^2 Du + K Du m) for the residual state.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>

#include "blas.hpp"
#include "forward_state.hpp"
#include "problem.hpp"
#include "small.hpp"

namespace lsp {
namespace {

// The pivot rule stops at a remaining variance below kPivotStop * Du * eps of the largest one. The
// factor is used only when what it leaves out, the trace of Gc - L^T L and the part of Bc outside
// the range of L^T, is below kRounding of the trace of Gc and of ||Bc||: the level at which float32
// products round the streamed sums (float64 sums leave ~1e-15). n rows give rank <= r exactly, so
// the remainder is rounding; a Gram and cross that are not of the same n rows fail the test, and the
// caller falls back to the Gram states.
constexpr double kPivotStop = 4.0;
constexpr double kRounding = 1e-5;

}  // namespace

Index pivoted_cholesky(Index n, Index rmax, const std::function<void(Index, double*)>& row, std::vector<double> d,
                       std::vector<double>& Lt, std::vector<Index>& piv) {
  double dmax = 0, trace = 0;
  for (double& v : d) {
    v = std::max(v, 0.0);
    dmax = std::max(dmax, v);
    trace += v;
  }
  if (!std::isfinite(trace)) return -1;
  Lt.assign(std::size_t(n) * rmax, 0.0);
  piv.clear();
  std::vector<double> a(n);
  const double stop = kPivotStop * double(n) * std::numeric_limits<double>::epsilon() * dmax;
  Index r = 0;
  for (; r < rmax; ++r) {
    const Index q = Index(std::max_element(d.begin(), d.end()) - d.begin());  // ties: lowest position
    if (!(d[q] > stop)) break;
    row(q, a.data());
    const double s = std::sqrt(d[q]), *lq = &Lt[std::size_t(q) * rmax];
#pragma omp parallel for schedule(static) if (n * r > 100000)
    for (Index p = 0; p < n; ++p) {
      double* lp = &Lt[std::size_t(p) * rmax];
      double v = a[p];
      for (Index t = 0; t < r; ++t) v -= lp[t] * lq[t];
      lp[r] = v / s;
      d[p] = std::max(d[p] - lp[r] * lp[r], 0.0);
    }
    for (Index t : piv) Lt[std::size_t(t) * rmax + r] = 0.0;  // exactly eliminated
    Lt[std::size_t(q) * rmax + r] = s;
    d[q] = 0.0;
    piv.push_back(q);
  }
  double left = 0;
  for (double v : d) left += v;
  if (!(left <= kRounding * trace)) return -1;
  if (r < rmax) {  // repack n x rmax -> n x r
    for (Index p = 0; p < n; ++p) std::memmove(&Lt[std::size_t(p) * r], &Lt[std::size_t(p) * rmax], sizeof(double) * r);
    Lt.resize(std::size_t(n) * r);
  }
  return r;
}

namespace {

// Gc = Lt Lt^T over the candidate positions (Lt: Du x r, row p = l_p), or -1 (pivoted_cholesky).
Index pivoted_factor(const Problem& P, Index rmax, std::vector<double>& Lt, std::vector<Index>& piv) {
  const Groups& grp = P.groups();
  const Index Du = Index(grp.columns.size());
  const double lam = P.lambda();
  std::vector<double> d(Du);
  for (Index p = 0; p < Du; ++p) d[p] = P.gram_diag(grp.columns[p]) - lam;
  auto row = [&](Index q, double* out) {
    P.gram_row(grp.columns[q], grp.columns.data(), Du, out);
    out[q] -= lam;
  };
  return pivoted_cholesky(Du, rmax, row, std::move(d), Lt, piv);
}

// T (r x m) with Bc = Lt T, from the pivot rows (Lt there is lower triangular in pivot order);
// false when the remaining rows of Bc disagree (a cross that is not of the Gram's rows).
bool cross_factor(const Problem& P, const std::vector<double>& Lt, Index ld, Index r, const std::vector<Index>& piv,
                  std::vector<double>& T) {
  const Groups& grp = P.groups();
  const Index Du = Index(grp.columns.size()), m = P.m();
  T.assign(std::size_t(r) * m, 0.0);
  for (Index i = 0; i < r; ++i) {  // forward substitution over the pivots
    double* ti = &T[std::size_t(i) * m];
    std::memcpy(ti, P.cross_row(grp.columns[piv[i]]), sizeof(double) * m);
    const double* li = &Lt[std::size_t(piv[i]) * ld];
    for (Index k = 0; k < i; ++k) {
      const double* tk = &T[std::size_t(k) * m];
      for (Index c = 0; c < m; ++c) ti[c] -= li[k] * tk[c];
    }
    for (Index c = 0; c < m; ++c) ti[c] /= li[i];
  }
  double res = 0, tot = 0;
#pragma omp parallel for reduction(+ : res, tot) schedule(static)
  for (Index p = 0; p < Du; ++p) {
    const double *b = P.cross_row(grp.columns[p]), *lp = &Lt[std::size_t(p) * ld];
    std::vector<double> v(b, b + m);
    for (Index k = 0; k < r; ++k) {
      const double a = lp[k], *tk = &T[std::size_t(k) * m];
      for (Index c = 0; c < m; ++c) v[c] -= a * tk[c];
    }
    for (Index c = 0; c < m; ++c) {
      res += v[c] * v[c];
      tot += b[c] * b[c];
    }
  }
  return std::isfinite(res) && res <= kRounding * kRounding * tot;
}

// T' (r x rc) with T' T'^T = T T^T: T itself when m <= r, else from the eigenvectors of T T^T.
std::vector<double> compressed(const std::vector<double>& T, Index r, Index m, Index& rc) {
  if (m <= r) {
    rc = m;
    return T;
  }
  std::vector<double> M(std::size_t(r) * r, 0.0), w(r);
  blas::syrk_n(r, m, 1.0, T.data(), m, 0.0, M.data(), r);
  for (Index i = 0; i < r; ++i)
    for (Index j = 0; j < i; ++j) M[std::size_t(i) * r + j] = M[std::size_t(j) * r + i];
  if (blas::syevd(r, M.data(), r, w.data()) != 0) throw NumericalError("internal: eigen-decomposition failed");
  const double wmax = r > 0 ? std::max(w[r - 1], 0.0) : 0.0;
  std::vector<Index> keep;
  for (Index i = 0; i < r; ++i)
    if (w[i] > 1e-15 * wmax) keep.push_back(i);
  rc = std::max<Index>(Index(keep.size()), 1);
  std::vector<double> Tc(std::size_t(r) * rc, 0.0);
  for (std::size_t q = 0; q < keep.size(); ++q) {
    const double s = std::sqrt(w[keep[q]]);
    for (Index i = 0; i < r; ++i) Tc[std::size_t(i) * rc + q] = M[std::size_t(keep[q]) * r + i] * s;
  }
  return Tc;
}

struct LowRankState final : HostGainsState {
  Problem& P;
  const Groups& grp;
  const bool omp;
  Index NG, m, Du, r, rc;
  double lam;
  std::vector<double> Lt, Ut, Rt, T;  // Du x r, Du x r, Du x rc, r x m
  std::vector<double> tol;
  std::vector<Index> sel_cols, sel_pos;
  std::vector<double> work;
  Index work_stride, chunk;

  LowRankState(Problem& p, bool omp_, double rcond, Index rank, std::vector<double>&& L, std::vector<double>&& Tin)
      : P(p), grp(p.groups()), omp(omp_), NG(grp.size()), m(p.m()), Du(Index(grp.columns.size())), r(rank),
        lam(p.lambda()), T(std::move(Tin)) {
    Lt = std::move(L);
    const std::vector<double> Tc = compressed(T, r, m, rc);
    Ut.resize(Lt.size());
    for (std::size_t i = 0; i < Lt.size(); ++i) Ut[i] = Lt[i] / lam;  // (0 + lambda I)^{-1} L
    Rt.assign(std::size_t(Du) * rc, 0.0);  // R = Bc' = L^T T'
    if (r > 0) blas::gemm(false, false, Du, rc, r, 1.0, Lt.data(), r, Tc.data(), rc, 0.0, Rt.data(), rc);
    tol.resize(Du);
    for (Index q = 0; q < Du; ++q) tol[q] = std::max(rcond * P.gram_diag(grp.columns[q]), 0.0);
    state.assign(NG, ACTIVE);
    gain.assign(NG, 0.0);
    const Index g = grp.max_size();
    work_stride = 2 * g * g + g * rc;
    work.resize(std::size_t(omp_get_max_threads()) * work_stride);
    chunk = std::max<Index>(1, std::min<Index>(64, NG / (16 * omp_get_max_threads())));
  }

  // S_JJ = lambda (I + L_J^T U_J) of group g into S (gs x gs), its Cholesky in place; false: degenerate.
  bool schur(Index g, double* S) const {
    const Index gs = grp.size_of(g), o = grp.offsets[g];
    for (Index a = 0; a < gs; ++a)
      for (Index b = 0; b <= a; ++b) {
        const double *la = &Lt[std::size_t(o + a) * r], *ub = &Ut[std::size_t(o + b) * r];
        const double *lb = &Lt[std::size_t(o + b) * r], *ua = &Ut[std::size_t(o + a) * r];
        double s = 0;
        for (Index t = 0; t < r; ++t) s += la[t] * ub[t] + lb[t] * ua[t];  // symmetrised
        S[a * gs + b] = S[b * gs + a] = lam * ((a == b ? 1.0 : 0.0) + 0.5 * s);
      }
    return small::cholesky(S, gs, &tol[o]);
  }

  // ||chol(S_JJ)^{-1} R_J||^2 with S = chol(S_JJ) from schur(); buf: gs x rc scratch.
  double exact_gain(Index g, const double* S, double* buf) const {
    const Index gs = grp.size_of(g), o = grp.offsets[g];
    std::memcpy(buf, &Rt[std::size_t(o) * rc], sizeof(double) * gs * rc);
    small::solve_lower(S, gs, buf, rc, rc);
    double v = 0;
    for (Index k = 0; k < gs * rc; ++k) v += buf[k] * buf[k];
    return v;
  }

  void evaluate(Index g, double* buf) {
    const Index gs = grp.size_of(g), o = grp.offsets[g];
    double* S = buf;
    if (!schur(g, S)) {
      state[g] = DEGENERATE;
      return;
    }
    double v = 0;
    if (omp) {
      for (Index k = 0; k < gs * rc; ++k) v += Rt[std::size_t(o) * rc + k] * Rt[std::size_t(o) * rc + k];
    } else {
      v = exact_gain(g, S, buf + gs * gs);
    }
    gain[g] = v;
    if (!std::isfinite(v)) state[g] = DEGENERATE;
  }

  void evaluate_all() override {
#pragma omp parallel for schedule(dynamic, 16)
    for (Index g = 0; g < NG; ++g)
      if (state[g] == ACTIVE) evaluate(g, &work[std::size_t(omp_get_thread_num()) * work_stride]);
  }

  // Adds group J; returns its exact error drop. The sweep updates every position (chosen ones too: the
  // re-fit reads their u) and re-evaluates the live groups.
  double add(Index J) override {
    const Index gJ = grp.size_of(J), o = grp.offsets[J];
    std::vector<double> S(std::size_t(gJ) * gJ), buf(std::size_t(gJ) * rc);
    if (!schur(J, S.data())) throw NumericalError("internal: chosen group is singular");
    const double drop = exact_gain(J, S.data(), buf.data());
    const std::vector<double> UJ(&Ut[std::size_t(o) * r], &Ut[std::size_t(o) * r] + gJ * r);
    const std::vector<double> RJ(&Rt[std::size_t(o) * rc], &Rt[std::size_t(o) * rc] + gJ * rc);
    state[J] = CHOSEN;
    if (grp.max_size() == 1) {
      sweep_single(lam / (S[0] * S[0]), UJ.data(), RJ.data());
    } else {
      sweep(S.data(), gJ, UJ.data(), RJ.data());
    }
    for (Index i = 0; i < gJ; ++i) {
      sel_cols.push_back(grp.columns[o + i]);
      sel_pos.push_back(o + i);
    }
    return drop;
  }

  // The update of every position by a group of gJ > 1 columns as two BLAS-3 products: u_p -= Phi l_p and
  // R_p -= Psi l_p with Phi = lambda U_J S_JJ^{-1} U_J^T (r x r) and Psi = lambda R_J^T S_JJ^{-1} U_J^T
  // (rc x r), O(Du r (r + rc)) whatever gJ; then the live groups' gains.
  void sweep(const double* S, Index gJ, const double* UJ, const double* RJ) {
    std::vector<double> Wm(UJ, UJ + gJ * r), Vm(RJ, RJ + gJ * rc), Phi(std::size_t(r) * r), Psi(std::size_t(rc) * r);
    small::solve_lower(S, gJ, Wm.data(), r, r);    // L^{-1} U_J^T (gJ x r)
    small::solve_lower(S, gJ, Vm.data(), rc, rc);  // L^{-1} R_J (gJ x rc)
    blas::gemm(true, false, r, r, gJ, lam, Wm.data(), r, Wm.data(), r, 0.0, Phi.data(), r);
    blas::gemm(true, false, rc, r, gJ, lam, Vm.data(), rc, Wm.data(), r, 0.0, Psi.data(), r);
    blas::gemm(false, false, Du, r, r, -1.0, Lt.data(), r, Phi.data(), r, 1.0, Ut.data(), r);
    blas::gemm(false, true, Du, rc, r, -1.0, Lt.data(), r, Psi.data(), r, 1.0, Rt.data(), rc);
    evaluate_all();
  }

  // sweep() for single-column groups (Linear layers) without the block algebra: x = a l_p.u_J with
  // a = lambda / S_JJ, then S_pp = lambda (1 + l_p.u_p) and the gain from R_p.
  void sweep_single(double a, const double* uJ, const double* rJ) {
    const bool team = double(Du) * (3 * r + 3 * rc) > 2e5;
#pragma omp parallel for schedule(static) if (team)
    for (Index p = 0; p < Du; ++p) {
      if (state[p] == DEGENERATE) continue;
      const double* lp = &Lt[std::size_t(p) * r];
      double *up = &Ut[std::size_t(p) * r], *Rp = &Rt[std::size_t(p) * rc];
      double x = 0;
      for (Index t = 0; t < r; ++t) x += lp[t] * uJ[t];
      x *= a;
      double lu = 0, rr = 0;
      for (Index t = 0; t < r; ++t) {
        up[t] -= x * uJ[t];
        lu += lp[t] * up[t];
      }
      for (Index c = 0; c < rc; ++c) {
        Rp[c] -= x * rJ[c];
        rr += Rp[c] * Rp[c];
      }
      if (state[p] != ACTIVE) continue;
      const double d = lam * (1.0 + lu);
      gain[p] = omp ? rr : rr / d;
      if (!(d > tol[p]) || !std::isfinite(d) || !std::isfinite(gain[p])) state[p] = DEGENERATE;
    }
  }

  Index selected_columns() const override { return Index(sel_cols.size()); }
  void reserve(Index cap) override {
    sel_cols.reserve(cap);
    sel_pos.reserve(cap);
  }
  void release() override {
    for (std::vector<double>* x : {&Lt, &Rt, &work}) std::vector<double>().swap(*x);
  }

  void factors(std::vector<Index>&, std::vector<double>&, std::vector<double>&) override {
    throw std::logic_error("internal: the low-rank state gives its weights directly");
  }
  // W_S^T = U_S^T T (K x m, selection order).
  void weights(std::vector<Index>& cols, std::vector<double>& Wt) override {
    cols = sel_cols;
    const Index K = Index(cols.size());
    std::vector<double> US(std::size_t(K) * r);
    for (Index i = 0; i < K; ++i) std::memcpy(&US[std::size_t(i) * r], &Ut[std::size_t(sel_pos[i]) * r], sizeof(double) * r);
    Wt.assign(std::size_t(K) * m, 0.0);
    if (K > 0 && r > 0) blas::gemm(false, false, K, m, r, 1.0, US.data(), r, T.data(), m, 0.0, Wt.data(), m);
  }
};

}  // namespace

Index rows_rank_bound(double n, bool fit_intercept) {
  const double rn = std::floor(n + 0.5);
  if (!(n > 0) || std::abs(n - rn) > 1e-9 * rn || rn > 1e15) return -1;  // not a count of rows
  return Index(rn) - (fit_intercept ? 1 : 0);
}

Index lowrank_rank_bound(const Problem& P) { return rows_rank_bound(P.count(), P.fit_intercept()); }

bool lowrank_forward_pays(Index Du, Index m, Index K, Index g, Index r) {
  if (r < 0 || 4 * r > Du || K <= 0) return false;
  const double d = double(Du), mm = double(m), k = double(K), rr = double(r);
  const double gs = double(std::clamp<Index>(g, 1, 12));
  // Both CPU alternatives in the blocked state's cost units (blocked_forward_pays): memory-bound
  // sweeps at a twelfth of BLAS-3 speed, rank-g steps gaining g of that back. Per step the low-rank
  // state does three Du x r x g products and the gains (about 4 K Du r in all), plus the factor.
  const double lowrank = 12.0 / gs * 4.0 * k * d * rr + 12.0 * d * rr * rr;
  const double residual = 12.0 / gs * (0.5 * k * k * d + 2.0 * k * d * mm);
  const double blocked = d * d * mm + 3.0 * d * d * k + 12.0 * 1.5 * 64.0 * k * d;
  return lowrank < residual && lowrank < blocked;
}

std::unique_ptr<ForwardStateBase> make_lowrank_forward_state(Problem& P, bool omp, double rcond) {
  const Index rmax = std::min<Index>(lowrank_rank_bound(P), Index(P.groups().columns.size()));
  if (rmax < 0 || !(P.lambda() > 0)) return nullptr;
  std::vector<double> Lt, T;
  std::vector<Index> piv;
  const Index r = pivoted_factor(P, rmax, Lt, piv);
  if (r < 0) return nullptr;
  if (!cross_factor(P, Lt, r, r, piv, T)) return nullptr;
  return std::make_unique<LowRankState>(P, omp, rcond, r, std::move(Lt), std::move(T));
}

}  // namespace lsp
