// Greedy forward selection / OMP with the Schur complements held as dense D x D
// matrices and updated in blocks (BLAS-3), in the manner of LAPACK's pivoted
// Cholesky (dpstrf): the greedy choice only needs every group's diagonal blocks,
// which are updated exactly at each step, while the full matrices are brought up
// to date every kBlock columns by one syrk / syr2k. docs/design.md, "Blocked
// forward state".
//
// With S = Gd - C^T C (the residual Gram) and M = R R^T (R = Bc - C^T Z, the
// residual cross), adding the column at position p (l^2 = S_pp) gives the new
// rows c = S_{:,p} / l, z = R_p / l and
//   S' = S - c c^T,   M' = M - c v^T - v c^T,   v = M_{:,p} / l - (M_pp / 2 l^2) c,
// with the error drop ||z||^2 = M_pp / l^2. A group's gain is tr(S_JJ^{-1} M_JJ)
// (forward) or tr(M_JJ) (omp): the same criteria as the residual state
// (forward.cpp), from g x g blocks instead of g x m residual rows. Cost: D^2 m
// once for M, then about 3 D^2 per added column at BLAS-3 speed, independent of
// m; the residual state streams a D x m matrix per column (memory-bound).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "blas.hpp"
#include "forward_state.hpp"
#include "problem.hpp"
#include "small.hpp"

namespace lsp {
namespace {

constexpr Index kBlock = 64;  // columns between two BLAS-3 updates of S and M

struct BlockedState final : HostGainsState {
  Problem& P;
  const Groups& grp;
  const bool omp;
  const double rcond;
  const Index NG, m, Du;
  Index Dact, dead = 0;            // positions in the layout; those of chosen/degenerate groups in it
  std::vector<Index> pos2col;      // position -> column
  std::vector<Index> wstart;       // group -> its first position
  std::vector<char> counted;
  std::vector<double> S, M;        // Dact x Dact (leading dim Dact), upper triangle valid, as of the last flush
  std::vector<double> Cb, Vb;      // nb rows of stride Du (Dact used): the rows c, v added since the last flush
  Index nb = 0;
  std::vector<double> Sblk, Mblk;  // every group's g x g diagonal blocks, always current
  std::vector<Index> dboff;
  std::vector<double> tol, scol, mcol;
  std::vector<Index> sel_cols;     // columns in selection order

  BlockedState(Problem& p, bool omp_, double rc)
      : P(p), grp(p.groups()), omp(omp_), rcond(rc), NG(grp.size()), m(p.m()), Du(Index(grp.columns.size())) {
    Dact = Du;
    pos2col = grp.columns;
    wstart.assign(grp.offsets.begin(), grp.offsets.end() - 1);
    state.assign(NG, ACTIVE);
    counted.assign(NG, 0);
    gain.assign(NG, 0.0);
    S.resize(std::size_t(Du) * Du);
#pragma omp parallel for schedule(static)
    for (Index q = 0; q < Du; ++q) P.gram_row(pos2col[q], pos2col.data(), Du, &S[std::size_t(q) * Du]);
    M.assign(std::size_t(Du) * Du, 0.0);
    {
      std::vector<double> Bu(std::size_t(Du) * m);  // the candidates' cross rows in position order
      for (Index q = 0; q < Du; ++q) std::memcpy(&Bu[std::size_t(q) * m], P.cross_row(pos2col[q]), sizeof(double) * m);
      blas::syrk_n(Du, m, 1.0, Bu.data(), m, 0.0, M.data(), Du);
    }
    dboff.resize(NG + 1, 0);
    for (Index g = 0; g < NG; ++g) dboff[g + 1] = dboff[g] + grp.size_of(g) * grp.size_of(g);
    Sblk.resize(dboff[NG]);
    Mblk.resize(dboff[NG]);
    tol.resize(Du);
    for (Index g = 0; g < NG; ++g) {
      const Index gs = grp.size_of(g), o = grp.offsets[g];
      for (Index a = 0; a < gs; ++a) {
        // the same degeneracy threshold as the residual state (forward.cpp)
        tol[o + a] = std::max(rcond * P.gram_diag(pos2col[o + a]), 0.0);
        for (Index b = 0; b < gs; ++b) {
          const Index lo = o + std::min(a, b), hi = o + std::max(a, b);
          Sblk[dboff[g] + a * gs + b] = S[std::size_t(lo) * Du + hi];
          Mblk[dboff[g] + a * gs + b] = M[std::size_t(lo) * Du + hi];
        }
      }
    }
    Cb.resize(std::size_t(kBlock) * Du);
    Vb.resize(std::size_t(kBlock) * Du);
    scol.resize(Du);
    mcol.resize(Du);
  }

  // Row p of a flushed symmetric matrix (upper triangle) into out.
  void row_of(const std::vector<double>& A, Index p, double* out) const {
    for (Index q = 0; q < p; ++q) out[q] = A[std::size_t(q) * Dact + p];
    std::memcpy(out + p, &A[std::size_t(p) * Dact + p], sizeof(double) * (Dact - p));
  }

  // Brings S and M up to date with the nb rows added since the last flush, then drops the
  // positions of chosen and degenerate groups once they are a quarter of the layout.
  void flush() {
    if (nb == 0) return;
    blas::syrk_t(Dact, nb, -1.0, Cb.data(), Du, 1.0, S.data(), Dact);
    blas::syr2k_t(Dact, nb, -1.0, Cb.data(), Du, Vb.data(), Du, 1.0, M.data(), Dact);
    nb = 0;
    count_dead();
    if (dead >= kBlock && dead * 4 >= Dact) compact();
  }

  void count_dead() {
    for (Index g = 0; g < NG; ++g)
      if (state[g] != ACTIVE && !counted[g]) {
        counted[g] = 1;
        dead += grp.size_of(g);
      }
  }

  // Moves the active groups' rows and columns of S and M to the front, in place: new entry (i, j)
  // comes from (from[i], from[j]) with from increasing, so every read lies at or after every write
  // made before it.
  void compact() {
    std::vector<Index> live, from;
    for (Index g = 0; g < NG; ++g)
      if (state[g] == ACTIVE) live.push_back(g);
    std::sort(live.begin(), live.end(), [&](Index a, Index b) { return wstart[a] < wstart[b]; });
    for (Index g : live) {
      const Index o = wstart[g];
      wstart[g] = Index(from.size());
      for (Index a = 0; a < grp.size_of(g); ++a) from.push_back(o + a);
    }
    const Index Dn = Index(from.size());
    for (std::vector<double>* A : {&S, &M}) {
      double* a = A->data();
      for (Index i = 0; i < Dn; ++i) {
        const double* src = a + std::size_t(from[i]) * Dact;
        double* dst = a + std::size_t(i) * Dn;
        for (Index j = i; j < Dn; ++j) dst[j] = src[from[j]];
      }
    }
    for (Index i = 0; i < Dn; ++i) pos2col[i] = pos2col[from[i]];
    Dact = Dn;
    dead = 0;
  }

  // Gain of active group g from its current blocks, or marks it degenerate.
  void evaluate(Index g) {
    const Index gs = grp.size_of(g), o = grp.offsets[g];
    const double* Sg = &Sblk[dboff[g]];
    const double* Mg = &Mblk[dboff[g]];
    double v;
    if (gs == 1) {
      const double d = Sg[0];
      if (!(d > tol[o]) || !std::isfinite(d)) {
        state[g] = DEGENERATE;
        return;
      }
      v = omp ? Mg[0] : Mg[0] / d;
    } else {
      thread_local std::vector<double> scratch;  // per thread: evaluate() runs in parallel over groups
      if (scratch.size() < std::size_t(2 * gs * gs)) scratch.resize(2 * gs * gs);
      double* Lp = scratch.data();
      double* Xp = Lp + gs * gs;
      std::memcpy(Lp, Sg, sizeof(double) * gs * gs);
      if (!small::cholesky(Lp, gs, &tol[o])) {
        state[g] = DEGENERATE;
        return;
      }
      v = 0;
      if (omp) {
        for (Index a = 0; a < gs; ++a) v += Mg[a * gs + a];
      } else {  // tr(L^{-1} M L^{-T}): X = L^{-1} M, then L^{-1} X^T (M symmetric)
        std::memcpy(Xp, Mg, sizeof(double) * gs * gs);
        small::solve_lower(Lp, gs, Xp, gs, gs);
        for (Index a = 0; a < gs; ++a)
          for (Index b = 0; b < a; ++b) std::swap(Xp[a * gs + b], Xp[b * gs + a]);
        small::solve_lower(Lp, gs, Xp, gs, gs);
        for (Index a = 0; a < gs; ++a) v += Xp[a * gs + a];
      }
    }
    // rounding can leave a fully explained residual slightly negative
    gain[g] = std::max(v, 0.0);
    if (!std::isfinite(v)) state[g] = DEGENERATE;
  }

  // Every active group's gain; a team of threads only where the g x g algebra outweighs waking it.
  void evaluate_all() override {
    const bool team = double(NG) * grp.max_size() * grp.max_size() * grp.max_size() > 2e6;
#pragma omp parallel for schedule(dynamic, 16) if (team)
    for (Index g = 0; g < NG; ++g)
      if (state[g] == ACTIVE) evaluate(g);
  }

  // Adds column t of group J (its pivot l2 = the current S_pp at position p), returns ||z||^2.
  double add_column(Index J, Index t) {
    const Index p = wstart[J] + t;
    const double l2 = Sblk[dboff[J] + t * (grp.size_of(J) + 1)];
    const double mpp = Mblk[dboff[J] + t * (grp.size_of(J) + 1)];
    if (!(l2 > 0) || !std::isfinite(l2)) throw NumericalError("internal: chosen group is singular");
    row_of(S, p, scol.data());
    row_of(M, p, mcol.data());
    if (nb > 0) {  // the rows added since the flush: s -= Cb^T Cb[:, p], m -= Cb^T Vb[:, p] + Vb^T Cb[:, p]
      std::vector<double> a(nb), b(nb);
      for (Index i = 0; i < nb; ++i) {
        a[i] = Cb[std::size_t(i) * Du + p];
        b[i] = Vb[std::size_t(i) * Du + p];
      }
      blas::gemv_t(nb, Dact, -1.0, Cb.data(), Du, a.data(), 1.0, scol.data());
      blas::gemv_t(nb, Dact, -1.0, Cb.data(), Du, b.data(), 1.0, mcol.data());
      blas::gemv_t(nb, Dact, -1.0, Vb.data(), Du, a.data(), 1.0, mcol.data());
    }
    const double l = std::sqrt(l2), zz = std::max(mpp, 0.0) / l2;
    double* c = &Cb[std::size_t(nb) * Du];
    double* v = &Vb[std::size_t(nb) * Du];
    for (Index q = 0; q < Dact; ++q) {
      c[q] = scol[q] / l;
      v[q] = mcol[q] / l - 0.5 * zz * c[q];
    }
    ++nb;
    update_blocks(c, v, J);
    sel_cols.push_back(pos2col[p]);
    if (nb == kBlock) flush();
    return zz;
  }

  // The diagonal blocks of every active group (and of J, being added) lose c c^T and c v^T + v c^T.
  void update_blocks(const double* c, const double* v, Index J) {
    const bool team = double(Dact) * grp.max_size() > 2e6;
#pragma omp parallel for schedule(static) if (team)
    for (Index g = 0; g < NG; ++g) {
      if (state[g] != ACTIVE && g != J) continue;
      const Index gs = grp.size_of(g), o = wstart[g];
      double* Sg = &Sblk[dboff[g]];
      double* Mg = &Mblk[dboff[g]];
      for (Index a = 0; a < gs; ++a)
        for (Index b = 0; b < gs; ++b) {
          Sg[a * gs + b] -= c[o + a] * c[o + b];
          Mg[a * gs + b] -= c[o + a] * v[o + b] + v[o + a] * c[o + b];
        }
    }
  }

  double add(Index J) override {
    double drop = 0;
    for (Index t = 0; t < grp.size_of(J); ++t) drop += add_column(J, t);
    state[J] = CHOSEN;
    evaluate_all();
    return drop;
  }

  Index selected_columns() const override { return Index(sel_cols.size()); }
  void reserve(Index cap) override { sel_cols.reserve(cap); }
  void release() override {
    for (std::vector<double>* x : {&S, &M, &Cb, &Vb, &Sblk, &Mblk}) std::vector<double>().swap(*x);
  }

  // The factor of the chosen columns' Gram in selection order, from a fresh Cholesky
  // (the steps kept only the diagonal blocks exact), and Z = L^{-1} Bc_S.
  void factors(std::vector<Index>& cols, std::vector<double>& L, std::vector<double>& Z) override {
    release();
    cols = sel_cols;
    const Index K = Index(cols.size());
    std::vector<double> U(std::size_t(K) * K);
    for (Index i = 0; i < K; ++i) P.gram_row(cols[i], cols.data(), K, &U[std::size_t(i) * K]);
    if (K > 0 && blas::potrf_upper(K, U.data(), K) != 0) throw NumericalError("internal: chosen columns are singular");
    L.assign(std::size_t(K) * K, 0.0);
    for (Index i = 0; i < K; ++i)
      for (Index k = 0; k <= i; ++k) L[std::size_t(i) * K + k] = U[std::size_t(k) * K + i];
    Z.resize(std::size_t(K) * m);
    for (Index i = 0; i < K; ++i) std::memcpy(&Z[std::size_t(i) * m], P.cross_row(cols[i]), sizeof(double) * m);
    if (K > 0) blas::trsm_upper_t(K, m, U.data(), K, Z.data(), m);
  }
};

}  // namespace

std::unique_ptr<ForwardStateBase> make_blocked_forward_state(Problem& P, bool omp, double rcond) {
  return std::make_unique<BlockedState>(P, omp, rcond);
}

bool blocked_forward_pays(Index Du, Index m, Index K, Index g) {
  if (Du < 2 * kBlock || K <= 0) return false;
  const double d = double(Du), mm = double(m), k = double(K);
  // Memory-bound sweeps run at about a twelfth of BLAS-3 speed on the machines measured
  // (benchmarks/results/forward_update.md); the residual state's rank-g steps gain about g of that back.
  constexpr double kStream = 12.0;
  const double residual = kStream / double(std::clamp<Index>(g, 1, Index(kStream))) * (0.5 * k * k * d + 2.0 * k * d * mm);
  const double blocked = d * d * mm + 3.0 * d * d * k + kStream * 1.5 * kBlock * k * d;
  // The two D x D matrices may not ask for much more memory than the residual state's R and C.
  const bool fits = 2.0 * d * d <= 2.0 * (d * mm + k * d) + double(1 << 26);
  return fits && blocked < residual;
}

}  // namespace lsp
