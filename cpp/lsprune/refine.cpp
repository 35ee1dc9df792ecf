// Swap refinement of a selection (docs/design.md, "Swap refinement"): best-improvement
// local search that exchanges one kept group for one candidate while the LS error drops.
//
// With S the kept columns, H = Gd_SS^{-1}, W = H Bc_S and E the ridge objective:
//   removing kept group I raises E by  inc_I = tr(W_I^T H_II^{-1} W_I);
//   for a candidate J, with M = H Gd_{S,:} and R = Bc - Gd_{:,S} W (quantities w.r.t. S),
//   the Schur block and residual correlation w.r.t. S \ I are (T = H_II^{-1} M_IJ)
//     D'_J = D_J + M_IJ^T T,   r'_J = R_J + T^T W_I,
//   so adding J after removing I lowers E by gain = tr(D'_J^{-1} r'_J r'_J^T), and the swap
//   changes E by inc_I - gain. One step evaluates every (I, J) pair from M, R, R W^T and
//   W W^T in O(K^2 D + K D m) (no solve per pair), takes the best, and refactors Gd_SS
//   (O(K^3), below the O(K^2 D) of M) so the next step's decisions carry no drift.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "blas.hpp"
#include "problem.hpp"
#include "small.hpp"

namespace lsp {
namespace {

struct Swap {
  double delta = 0;  // change of the error (negative: better)
  Index out = -1, in = -1;
};

// Deterministic choice: the largest drop; ties go to the lowest (out, in).
bool better(const Swap& a, const Swap& b) {
  if (a.out < 0) return false;
  if (b.out < 0) return true;
  if (a.delta != b.delta) return a.delta < b.delta;
  return a.out != b.out ? a.out < b.out : a.in < b.in;
}

class SwapSearch {
 public:
  SwapSearch(Problem& P, std::vector<Index> kept, const std::vector<Index>& force, double rcond)
      : P_(P), grp_(P.groups()), m_(P.m()), Du_(Index(grp_.columns.size())), rcond_(rcond), kept_(std::move(kept)) {
    forced_.assign(grp_.size(), 0);
    for (Index f : force) forced_[f] = 1;
    pos_.assign(grp_.offsets.begin(), grp_.offsets.end() - 1);  // group -> first position in U
  }

  // Factors Gd_SS for the current kept set; false when it is singular (refinement stops).
  bool factor() {
    cols_.clear();
    koff_.assign(1, 0);
    for (Index g : kept_) {
      for (Index k = grp_.offsets[g]; k < grp_.offsets[g + 1]; ++k) cols_.push_back(grp_.columns[k]);
      koff_.push_back(Index(cols_.size()));
    }
    const Index K = Index(cols_.size());
    H_.assign(std::size_t(K) * K, 0.0);
    for (Index i = 0; i < K; ++i) P_.gram_row(cols_[i], cols_.data(), K, &H_[std::size_t(i) * K]);
    if (K > 0 && (blas::potrf_upper_checked(K, H_.data(), K, rcond_) != 0 || blas::potri_upper(K, H_.data(), K) != 0))
      return false;
    for (Index i = 0; i < K; ++i)  // potri fills the upper triangle: mirror it
      for (Index j = 0; j < i; ++j) H_[std::size_t(i) * K + j] = H_[std::size_t(j) * K + i];
    B_.resize(std::size_t(K) * m_);
    for (Index i = 0; i < K; ++i) std::copy_n(P_.cross_row(cols_[i]), m_, &B_[std::size_t(i) * m_]);
    W_.assign(std::size_t(K) * m_, 0.0);
    if (K > 0) blas::gemm(false, false, K, m_, K, 1.0, H_.data(), K, B_.data(), m_, 0.0, W_.data(), m_);
    double fit = 0;
    for (std::size_t q = 0; q < W_.size(); ++q) fit += W_[q] * B_[q];
    error_ = std::max(P_.energy() - fit, 0.0);
    return true;
  }

  double error() const { return error_; }
  const std::vector<Index>& kept() const { return kept_; }

  // The best swap of this state (out = -1 when there is no candidate at all).
  Swap best() {
    prepare();
    std::vector<char> is_kept(grp_.size(), 0);
    for (Index g : kept_) is_kept[g] = 1;
    std::vector<Index> cand;
    for (Index g = 0; g < grp_.size(); ++g)
      if (!is_kept[g] && schur_ok_[g]) cand.push_back(g);
    Swap best;
#pragma omp parallel
    {
      Swap mine;
      std::vector<double> buf(std::size_t(4) * gmax() * gmax());
#pragma omp for schedule(dynamic, 1) nowait
      for (Index a = 0; a < Index(kept_.size()); ++a) {
        if (forced_[kept_[a]] || !std::isfinite(inc_[a])) continue;
        for (Index J : cand) {
          const Swap s{swap_delta(a, J, buf.data()), kept_[a], J};
          if (std::isfinite(s.delta) && better(s, mine)) mine = s;
        }
      }
#pragma omp critical
      if (better(mine, best)) best = mine;
    }
    return best;
  }

  void apply(const Swap& s) { std::replace(kept_.begin(), kept_.end(), s.out, s.in); }

 private:
  Index gmax() const { return grp_.max_size(); }

  // M = H Gd_{S,U}, R = Bc_U - Gd_{U,S} W, RW = R W^T, WW = W W^T, and per candidate
  // group its Schur block D_J (factored later per pair) and R_J R_J^T.
  void prepare() {
    const Index K = Index(cols_.size());
    std::vector<double> GSU(std::size_t(K) * Du_);
#pragma omp parallel for schedule(static)
    for (Index i = 0; i < K; ++i) P_.gram_row(cols_[i], grp_.columns.data(), Du_, &GSU[std::size_t(i) * Du_]);
    M_.assign(std::size_t(K) * Du_, 0.0);
    R_.resize(std::size_t(Du_) * m_);
    for (Index p = 0; p < Du_; ++p) std::copy_n(P_.cross_row(grp_.columns[p]), m_, &R_[std::size_t(p) * m_]);
    RW_.assign(std::size_t(Du_) * K, 0.0);
    WW_.assign(std::size_t(K) * K, 0.0);
    if (K > 0) {
      blas::gemm(false, false, K, Du_, K, 1.0, H_.data(), K, GSU.data(), Du_, 0.0, M_.data(), Du_);
      blas::gemm(true, false, Du_, m_, K, -1.0, GSU.data(), Du_, W_.data(), m_, 1.0, R_.data(), m_);
      blas::gemm(false, true, Du_, K, m_, 1.0, R_.data(), m_, W_.data(), m_, 0.0, RW_.data(), K);
      blas::gemm(false, true, K, K, m_, 1.0, W_.data(), m_, W_.data(), m_, 0.0, WW_.data(), K);
    }
    const Index NG = grp_.size();
    dboff_.assign(NG + 1, 0);
    for (Index g = 0; g < NG; ++g) dboff_[g + 1] = dboff_[g] + grp_.size_of(g) * grp_.size_of(g);
    Dj_.assign(dboff_[NG], 0.0);
    RR_.assign(dboff_[NG], 0.0);
    schur_ok_.assign(NG, 1);
#pragma omp parallel for schedule(dynamic, 8)
    for (Index g = 0; g < NG; ++g) schur_block(g, GSU);
    kept_inverse();
  }

  // Per kept group I: H_II^{-1} (gi x gi, at hioff_[a]) and inc_I = tr(H_II^{-1} W_I W_I^T),
  // the error rise of removing it (NaN when H_II is not positive definite: never swapped out).
  void kept_inverse() {
    const Index K = Index(cols_.size()), nk = Index(kept_.size());
    hioff_.assign(nk + 1, 0);
    for (Index a = 0; a < nk; ++a) hioff_[a + 1] = hioff_[a] + (koff_[a + 1] - koff_[a]) * (koff_[a + 1] - koff_[a]);
    Hi_.assign(hioff_[nk], 0.0);
    inc_.assign(nk, std::numeric_limits<double>::quiet_NaN());
    std::vector<double> L(std::size_t(gmax()) * gmax()), zero(gmax(), 0.0);
    for (Index a = 0; a < nk; ++a) {
      const Index i0 = koff_[a], gi = koff_[a + 1] - i0;
      double* Hi = &Hi_[hioff_[a]];
      for (Index r = 0; r < gi; ++r)
        for (Index c = 0; c < gi; ++c) {
          L[r * gi + c] = H_[std::size_t(i0 + r) * K + i0 + c];
          Hi[r * gi + c] = r == c ? 1.0 : 0.0;
        }
      if (!small::cholesky(L.data(), gi, zero.data())) continue;
      small::solve_lower(L.data(), gi, Hi, gi, gi);
      solve_upper_t(L.data(), gi, Hi, gi);
      double inc = 0;
      for (Index r = 0; r < gi; ++r)
        for (Index c = 0; c < gi; ++c) inc += Hi[r * gi + c] * WW_[std::size_t(i0 + c) * K + i0 + r];
      inc_[a] = inc;
    }
  }

  void schur_block(Index g, const std::vector<double>& GSU) {
    const Index gs = grp_.size_of(g), o = grp_.offsets[g], p0 = pos_[g], K = Index(cols_.size());
    double* D = &Dj_[dboff_[g]];
    double* RR = &RR_[dboff_[g]];
    for (Index a = 0; a < gs; ++a) {
      P_.gram_row(grp_.columns[o + a], &grp_.columns[o], gs, &D[a * gs]);
      for (Index b = 0; b < gs; ++b) {
        double s = 0, r = 0;
        for (Index k = 0; k < K; ++k) s += GSU[std::size_t(k) * Du_ + p0 + a] * M_[std::size_t(k) * Du_ + p0 + b];
        for (Index k = 0; k < m_; ++k) r += R_[std::size_t(p0 + a) * m_ + k] * R_[std::size_t(p0 + b) * m_ + k];
        D[a * gs + b] -= s;
        RR[a * gs + b] = r;
      }
    }
    for (Index a = 0; a < gs; ++a)
      if (!std::isfinite(D[a * gs + a])) schur_ok_[g] = 0;
  }

  // inc_I - gain of exchanging kept group kept_[a] for candidate J (+inf when J would be
  // degenerate after the exchange). buf: scratch of 4 gmax^2 doubles.
  double swap_delta(Index a, Index J, double* buf) const {
    const Index K = Index(cols_.size()), i0 = koff_[a], gi = koff_[a + 1] - i0;
    const Index gj = grp_.size_of(J), p0 = pos_[J], o = grp_.offsets[J], g2 = gmax() * gmax();
    double *T = buf, *Dp = buf + g2, *A = buf + 2 * g2, *tol = buf + 3 * g2;
    const double* Hi = &Hi_[hioff_[a]];
    // T = H_II^{-1} M_IJ (gi x gj)
    for (Index r = 0; r < gi; ++r)
      for (Index c = 0; c < gj; ++c) {
        double t = 0;
        for (Index k = 0; k < gi; ++k) t += Hi[r * gi + k] * M_[std::size_t(i0 + k) * Du_ + p0 + c];
        T[r * gj + c] = t;
      }
    // D' = D_J + M_IJ^T T ; A = RR_J + RW_JI T + T^T RW_JI^T + T^T WW_II T
    for (Index r = 0; r < gj; ++r)
      for (Index c = 0; c < gj; ++c) {
        double d = Dj_[dboff_[J] + r * gj + c], s = RR_[dboff_[J] + r * gj + c];
        for (Index k = 0; k < gi; ++k) {
          d += M_[std::size_t(i0 + k) * Du_ + p0 + r] * T[k * gj + c];
          s += RW_[std::size_t(p0 + r) * K + i0 + k] * T[k * gj + c] + T[k * gj + r] * RW_[std::size_t(p0 + c) * K + i0 + k];
          double u = 0;
          for (Index l = 0; l < gi; ++l) u += WW_[std::size_t(i0 + k) * K + i0 + l] * T[l * gj + c];
          s += T[k * gj + r] * u;
        }
        Dp[r * gj + c] = d;
        A[r * gj + c] = s;
      }
    for (Index r = 0; r < gj; ++r) tol[r] = std::max(rcond_ * P_.gram_diag(grp_.columns[o + r]), 0.0);
    if (!small::cholesky(Dp, gj, tol)) return std::numeric_limits<double>::infinity();
    // gain = tr(D'^{-1} A) = tr(L^{-1} A L^{-T}): solve L Y = A, transpose, solve again.
    small::solve_lower(Dp, gj, A, gj, gj);
    for (Index r = 0; r < gj; ++r)
      for (Index c = 0; c < r; ++c) std::swap(A[r * gj + c], A[c * gj + r]);
    small::solve_lower(Dp, gj, A, gj, gj);
    double gain = 0;
    for (Index r = 0; r < gj; ++r) gain += A[r * gj + r];
    return inc_[a] - gain;
  }

  // Solves L^T X = B in place (L lower g x g, B g x n row-major).
  static void solve_upper_t(const double* L, Index g, double* B, Index n) {
    for (Index i = g - 1; i >= 0; --i) {
      double* bi = B + i * n;
      for (Index k = i + 1; k < g; ++k)
        for (Index j = 0; j < n; ++j) bi[j] -= L[k * g + i] * B[k * n + j];
      for (Index j = 0; j < n; ++j) bi[j] /= L[i * g + i];
    }
  }

  Problem& P_;
  const Groups& grp_;
  const Index m_, Du_;
  const double rcond_;
  std::vector<Index> kept_, cols_, koff_, pos_, dboff_, hioff_;
  std::vector<char> forced_, schur_ok_;
  std::vector<double> H_, B_, W_, M_, R_, RW_, WW_, Dj_, RR_, Hi_, inc_;
  double error_ = 0;
};

}  // namespace

SelectResult refine_swaps(Problem& P, SelectResult&& res, const SelectOptions& opt, Index max_swaps) {
  if (max_swaps <= 0 || res.selected.empty()) return std::move(res);
  std::vector<Index> kept = res.selected;
  SwapSearch S(P, kept, opt.force, opt.rcond);
  if (!S.factor()) return std::move(res);
  // A swap must lower the error by more than rounding can explain (no cycling on ties).
  const double min_drop = policy::kSwapRelTol * std::max(P.energy(), std::numeric_limits<double>::min());
  Index done = 0;
  while (done < max_swaps) {
    const Swap s = S.best();
    if (s.out < 0 || !(s.delta < -min_drop)) break;
    S.apply(s);
    if (!S.factor()) break;  // cannot happen for an accepted pair; stop rather than guess
    ++done;
    res.swapped_out.push_back(s.out);
    res.swapped_in.push_back(s.in);
    res.error_path.push_back(P.errors_to_caller(S.error()));
    res.kept_path.push_back(Index(S.kept().size()));
    std::replace(res.selected.begin(), res.selected.end(), s.out, s.in);
    std::replace(res.removed.begin(), res.removed.end(), s.in, s.out);
  }
  if (done == 0) return std::move(res);
  // The weights: a fresh re-fit on the refined set (its error ends the path).
  SelectResult fit = refit(P, S.kept());
  fit.selected = std::move(res.selected);
  fit.removed = std::move(res.removed);
  fit.swapped_out = std::move(res.swapped_out);
  fit.swapped_in = std::move(res.swapped_in);
  if (opt.method == Method::Backward) std::sort(fit.selected.begin(), fit.selected.end());
  fit.skipped = std::move(res.skipped);
  fit.stopped_early = res.stopped_early;
  fit.kept_path = std::move(res.kept_path);
  fit.error_path = std::move(res.error_path);
  fit.error_path.back() = fit.error;
  return fit;
}

}  // namespace lsp
