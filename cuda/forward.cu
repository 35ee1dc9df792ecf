// Forward selection / OMP with the solver state on the GPU. The greedy loop,
// validation and the final LS solve are the CPU engine's (run_forward); this file
// provides the device state: the Cholesky/Schur factors C (K x Du), residual
// cross R (Du x m), per-group residual blocks and gains (docs/design.md, "Forward
// selection and OMP").
//
// Per step: gather A = C[:, J] and download it (for L), out = A^T C (one thread
// per column, C streamed once), c = L_J^{-1}(Gd_{J,:} - out), z = L_J^{-1} R_J,
// then one block per live group downdates its block and R rows and evaluates its
// gain in the same pass; the best group is found by a deterministic block
// reduction (ties: lowest index). The only host round trips per step are the
// chosen index, L_J (g x g) and A (K x g).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "common.cuh"
#include "lsprune/forward_state.hpp"
#include "lsprune/small.hpp"
#include "lsprune_cuda.hpp"

namespace lsp::cuda {
namespace {

constexpr int kMaxGroup = 49;  // largest group (a 7x7 conv channel) the device kernels handle
enum : signed char { ACTIVE = 0, CHOSEN = 1, DEGENERATE = 2 };

// Centred, damped Gram entry Gd[j, c] from the raw Gram on the device.
struct GramView {
  const double* G;
  const double* mx;
  Index D;
  double n, lam;
  bool centre;
  __device__ double operator()(Index j, Index c) const {
    double v = G[j * D + c];
    if (centre) v -= n * mx[j] * mx[c];
    if (j == c) v += lam;
    return v;
  }
};

// out[i, p] = sum_k A[k, i] C[k, p] for p < n (thread per column, G = compile-time bound on gJ).
template <int G>
__global__ void at_c_kernel(const double* __restrict A, Index K, int gJ, const double* __restrict C, Index ldc,
                            Index n, double* __restrict out) {
  const Index p = Index(blockIdx.x) * blockDim.x + threadIdx.x;
  __shared__ double As[32 * G];
  double acc[G];
#pragma unroll
  for (int i = 0; i < G; ++i) acc[i] = 0.0;
  for (Index k0 = 0; k0 < K; k0 += 32) {
    const int kb = int(K - k0 < 32 ? K - k0 : 32);
    __syncthreads();
    for (int t = threadIdx.x; t < kb * gJ; t += blockDim.x) As[t] = A[k0 * gJ + t];
    __syncthreads();
    if (p < n) {
      for (int kk = 0; kk < kb; ++kk) {
        const double cv = C[(k0 + kk) * ldc + p];
#pragma unroll
        for (int i = 0; i < G; ++i)
          if (i < gJ) acc[i] += As[kk * gJ + i] * cv;
      }
    }
  }
  if (p < n)
    for (int i = 0; i < gJ; ++i) out[i * n + p] = acc[i];
}

// c[:, p] = LJ^{-1} (Gd[col_i, pos2col[p]] - out[:, p]) for every working position p.
__global__ void make_c_kernel(GramView gd, const Index* __restrict cols_J, int gJ, const Index* __restrict pos2col,
                              Index n, const double* __restrict out, const double* __restrict LJ,
                              double* __restrict c) {
  const Index p = Index(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= n) return;
  double x[kMaxGroup];
  const Index col = pos2col[p];
  for (int i = 0; i < gJ; ++i) {
    double v = gd(cols_J[i], col) - out[i * n + p];
    for (int k = 0; k < i; ++k) v -= LJ[i * gJ + k] * x[k];
    x[i] = v / LJ[i * gJ + i];
    c[i * n + p] = x[i];
  }
}

// z = LJ^{-1} R[pj:pj+gJ, :] (thread per target column); one block sums ||z||^2
// in a fixed order (deterministic).
__global__ void make_z_kernel(const double* __restrict R, Index pj, int gJ, Index m, const double* __restrict LJ,
                              double* __restrict z, double* __restrict znorm) {
  __shared__ double part[256];
  double s = 0.0;
  for (Index k = threadIdx.x; k < m; k += blockDim.x) {
    double x[kMaxGroup];
    for (int i = 0; i < gJ; ++i) {
      double v = R[(pj + i) * m + k];
      for (int q = 0; q < i; ++q) v -= LJ[i * gJ + q] * x[q];
      x[i] = v / LJ[i * gJ + i];
      z[i * m + k] = x[i];
      s += x[i] * x[i];
    }
  }
  const double total = block_sum(s, part);
  if (threadIdx.x == 0) *znorm = total;
}

// A[k, i] = C[k, pj + i]
__global__ void gather_a_kernel(const double* __restrict C, Index ldc, Index K, Index pj, int gJ,
                                double* __restrict A) {
  const Index t = Index(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < K * gJ) A[t] = C[(t / gJ) * ldc + pj + t % gJ];
}

// One block per group: downdate its residual block and R rows by (c, z) of the
// chosen group (gJ = 0 at the start), factor the block, then its gain; or mark it
// degenerate. G = compile-time bound on the group size (registers).
template <int G>
__global__ void sweep_kernel(signed char* __restrict state, double* __restrict gain, const Index* __restrict wstart,
                             const Index* __restrict gsize, const Index* __restrict dboff,
                             const Index* __restrict goff, double* __restrict Dblk, const double* __restrict tol,
                             double* __restrict R, Index m, const double* __restrict c, Index ldc, int gJ,
                             const double* __restrict z, bool solve) {
  const Index g = blockIdx.x;
  if (state[g] != ACTIVE) return;
  const int gs = int(gsize[g]);
  const Index p = wstart[g];
  __shared__ double cc[G * G];  // gs x gJ, both <= G (the largest group)
  __shared__ double L[G * G];
  __shared__ double part[256];
  __shared__ int bad;
  for (int t = threadIdx.x; t < gs * gJ; t += blockDim.x) cc[t] = c[(t % gJ) * ldc + p + t / gJ];
  __syncthreads();
  double* Db = Dblk + dboff[g];
  for (int t = threadIdx.x; t < gs * gs; t += blockDim.x) {
    const int a = t / gs, b = t % gs;
    double s = 0.0;
    for (int i = 0; i < gJ; ++i) s += cc[a * gJ + i] * cc[b * gJ + i];
    Db[t] -= s;  // each entry downdated by its own thread: symmetric by construction
    L[t] = Db[t];
  }
  __syncthreads();
  if (threadIdx.x == 0) bad = !small_cholesky(L, gs, tol + goff[g]);  // the CPU engine's degeneracy test
  __syncthreads();
  if (bad) {
    if (threadIdx.x == 0) state[g] = DEGENERATE;
    return;
  }
  double s = 0.0;
  for (Index k = threadIdx.x; k < m; k += blockDim.x) {
    double x[G];
#pragma unroll
    for (int a = 0; a < G; ++a) {
      if (a >= gs) break;
      double v = R[(p + a) * m + k];
      for (int i = 0; i < gJ; ++i) v -= cc[a * gJ + i] * z[i * m + k];
      R[(p + a) * m + k] = v;
      x[a] = v;
    }
    if (solve) {
#pragma unroll
      for (int a = 0; a < G; ++a) {
        if (a >= gs) break;
        double v = x[a];
        for (int q = 0; q < a; ++q) v -= L[a * gs + q] * x[q];
        x[a] = v / L[a * gs + a];
      }
    }
#pragma unroll
    for (int a = 0; a < G; ++a) {
      if (a >= gs) break;
      s += x[a] * x[a];
    }
  }
  const double total = block_sum(s, part);
  if (threadIdx.x == 0) {
    gain[g] = total;
    if (!isfinite(total)) state[g] = DEGENERATE;
  }
}

// Best active group: largest gain, ties to the lowest index (a fixed-order
// reduction, so the result does not depend on scheduling). out = -1 if none.
__global__ void argmax_kernel(const signed char* __restrict state, const double* __restrict gain, Index NG,
                              Index* __restrict out) {
  __shared__ double bv[1024];
  __shared__ Index bi[1024];
  double v = -1.0;
  Index idx = -1;
  for (Index g = threadIdx.x; g < NG; g += blockDim.x)
    if (state[g] == ACTIVE && (idx < 0 || gain[g] > v)) {
      v = gain[g];
      idx = g;
    }
  bv[threadIdx.x] = v;
  bi[threadIdx.x] = idx;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) {
      const Index j = bi[threadIdx.x + w];
      const double u = bv[threadIdx.x + w];
      const Index i = bi[threadIdx.x];
      if (j >= 0 && (i < 0 || u > bv[threadIdx.x] || (u == bv[threadIdx.x] && j < i))) {
        bv[threadIdx.x] = u;
        bi[threadIdx.x] = j;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = bi[0];
}

template <class F>
void dispatch_group(int gmax, F&& f) {
  if (gmax <= 1) f(std::integral_constant<int, 1>());
  else if (gmax <= 4) f(std::integral_constant<int, 4>());
  else if (gmax <= 9) f(std::integral_constant<int, 9>());
  else if (gmax <= 16) f(std::integral_constant<int, 16>());
  else if (gmax <= 25) f(std::integral_constant<int, 25>());
  else f(std::integral_constant<int, kMaxGroup>());
}

class DeviceForwardState final : public ForwardStateBase {
 public:
  DeviceForwardState(Problem& P, const double* host_gram, const double* host_mx, bool omp, double rcond)
      : P_(P), grp_(P.groups()), omp_(omp), NG_(grp_.size()), m_(P.m()), Du_(Index(grp_.columns.size())) {
    gmax_ = int(grp_.max_size());
    if (gmax_ > kMaxGroup)
      throw std::invalid_argument("the CUDA engine handles groups of at most " + std::to_string(kMaxGroup) +
                                  " columns; use device='cpu' for larger groups");
    const Index D = P.D();
    gram_.resize(std::size_t(D) * D);
    gram_.upload(host_gram, std::size_t(D) * D);
    mx_.resize(D);
    mx_.upload(host_mx, D);
    gd_ = GramView{gram_.get(), mx_.get(), D, P.count(), P.lambda(), P.fit_intercept()};
    std::vector<Index> wstart(grp_.offsets.begin(), grp_.offsets.end() - 1), gsize(NG_), dboff(NG_ + 1, 0);
    for (Index g = 0; g < NG_; ++g) {
      gsize[g] = grp_.size_of(g);
      dboff[g + 1] = dboff[g] + gsize[g] * gsize[g];
    }
    std::vector<double> Db(dboff[NG_]), tol(Du_), R(std::size_t(Du_) * m_);
    for (Index g = 0; g < NG_; ++g) {
      const Index gs = gsize[g], o = grp_.offsets[g];
      for (Index i = 0; i < gs; ++i) {
        P.gram_row(grp_.columns[o + i], &grp_.columns[o], gs, &Db[dboff[g] + i * gs]);
        tol[o + i] = std::max(rcond * P.gram_diag(grp_.columns[o + i]), 0.0);
      }
    }
    for (Index p = 0; p < Du_; ++p) std::memcpy(&R[std::size_t(p) * m_], P.cross_row(grp_.columns[p]), 8 * m_);
    host_dblk_off_ = dboff;
    host_tol_ = tol;
    upload(wstart_, wstart);
    upload(gsize_, gsize);
    upload(dboff_, dboff);
    upload(goff_, std::vector<Index>(grp_.offsets.begin(), grp_.offsets.end()));
    upload(pos2col_, grp_.columns);
    upload(dblk_, Db);
    upload(tol_, tol);
    upload(R_, R);
    state_.resize(NG_);
    state_.zero();
    gain_.resize(NG_);
    best_.resize(1);
    znorm_.resize(1);
    host_state_.assign(NG_, ACTIVE);
  }

  void reserve(Index cap) override {
    C_.grow(std::size_t(cap) * Du_, std::size_t(K_) * Du_);
    Z_.grow(std::size_t(cap) * m_, std::size_t(K_) * m_);
    Lpacked_.reserve(std::size_t(cap) * (cap + 1) / 2);
  }

  void evaluate_all() override {
    sweep(nullptr, 0, nullptr);
    state_.download(host_state_.data(), NG_);  // forced groups must see which ones are degenerate
  }
  bool is_active(Index g) const override { return host_state_[g] == ACTIVE; }

  Index best() override {
    argmax_kernel<<<1, 1024>>>(state_.get(), gain_.get(), NG_, best_.get());
    check(cudaGetLastError(), "argmax kernel");
    Index J = -1;
    best_.download(&J, 1);
    return J;
  }

  double add(Index J) override {
    const Index gJ = grp_.size_of(J), o = grp_.offsets[J], pj = o;  // no compaction: positions are fixed
    // L_J = chol(Dblk_J) on the host (g x g), with the CPU engine's test.
    std::vector<double> LJ(gJ * gJ);
    dblk_.download(LJ.data(), gJ * gJ, host_dblk_off_[J]);
    if (!small::cholesky(LJ.data(), gJ, &host_tol_[o])) throw NumericalError("internal: chosen group is singular");
    upload(lj_, LJ);
    upload(colsJ_, std::vector<Index>(grp_.columns.begin() + o, grp_.columns.begin() + o + gJ));
    if (std::size_t(K_ + gJ) * Du_ > C_.size()) grow(K_ + gJ);
    A_.resize(std::max<Index>(1, K_ * gJ));
    std::vector<double> A(K_ * gJ);
    if (K_ > 0) {
      gather_a_kernel<<<blocks_for(K_ * gJ, 256), 256>>>(C_.get(), Du_, K_, pj, int(gJ), A_.get());
      check(cudaGetLastError(), "gather kernel");
      A_.download(A.data(), A.size());
    }
    out_.resize(std::size_t(gJ) * Du_);
    dispatch_group(int(gJ), [&](auto G) {
      at_c_kernel<G><<<blocks_for(Du_, 128), 128>>>(A_.get(), K_, int(gJ), C_.get(), Du_, Du_, out_.get());
    });
    check(cudaGetLastError(), "at_c kernel");
    cnew_.resize(std::size_t(gJ) * Du_);
    make_c_kernel<<<blocks_for(Du_, 128), 128>>>(gd_, colsJ_.get(), int(gJ), pos2col_.get(), Du_, out_.get(),
                                                  lj_.get(), cnew_.get());
    check(cudaGetLastError(), "make_c kernel");
    znew_.resize(std::size_t(gJ) * m_);
    make_z_kernel<<<1, 256>>>(R_.get(), pj, int(gJ), m_, lj_.get(), znew_.get(), znorm_.get());
    check(cudaGetLastError(), "make_z kernel");
    check(cudaMemcpy(C_.get() + std::size_t(K_) * Du_, cnew_.get(), sizeof(double) * gJ * Du_,
                     cudaMemcpyDeviceToDevice), "append C");
    check(cudaMemcpy(Z_.get() + std::size_t(K_) * m_, znew_.get(), sizeof(double) * gJ * m_,
                     cudaMemcpyDeviceToDevice), "append Z");
    for (Index i = 0; i < gJ; ++i) {
      for (Index k = 0; k < K_; ++k) Lpacked_.push_back(A[k * gJ + i]);
      for (Index k = 0; k <= i; ++k) Lpacked_.push_back(LJ[i * gJ + k]);
      sel_cols_.push_back(grp_.columns[o + i]);
    }
    K_ += gJ;
    const signed char chosen = CHOSEN;
    check(cudaMemcpy(state_.get() + J, &chosen, 1, cudaMemcpyHostToDevice), "state");
    host_state_[J] = CHOSEN;
    sweep(cnew_.get(), int(gJ), znew_.get());
    double zn = 0;
    znorm_.download(&zn, 1);
    return zn;
  }

  void after_step() override {  // keep the host's view of degenerate groups for is_active()
    state_.download(host_state_.data(), NG_);
  }

  Index selected_columns() const override { return K_; }

  void factors(std::vector<Index>& cols, std::vector<double>& L, std::vector<double>& Z) override {
    cols = sel_cols_;
    L.assign(std::size_t(K_) * K_, 0.0);
    std::size_t q = 0;
    for (Index i = 0; i < K_; ++i)
      for (Index k = 0; k <= i; ++k) L[std::size_t(i) * K_ + k] = Lpacked_[q++];
    Z.resize(std::size_t(K_) * m_);
    if (K_ > 0) Z_.download(Z.data(), Z.size());
  }

  std::vector<Index> degenerate() override {
    state_.download(host_state_.data(), NG_);
    std::vector<Index> out;
    for (Index g = 0; g < NG_; ++g)
      if (host_state_[g] == DEGENERATE) out.push_back(g);
    return out;
  }

 private:
  template <class T>
  static void upload(Buffer<T>& b, const std::vector<T>& h) {
    b.resize(std::max<std::size_t>(h.size(), 1));
    if (!h.empty()) b.upload(h.data(), h.size());
  }
  void grow(Index cols) {
    const Index cap = std::min(Du_, std::max(cols, 2 * K_));
    C_.grow(std::size_t(cap) * Du_, std::size_t(K_) * Du_);
    Z_.grow(std::size_t(cap) * m_, std::size_t(K_) * m_);
  }
  void sweep(const double* c, int gJ, const double* z) {
    dispatch_group(gmax_, [&](auto G) {
      sweep_kernel<G><<<unsigned(NG_), 128>>>(state_.get(), gain_.get(), wstart_.get(), gsize_.get(),
                                              dboff_.get(), goff_.get(), dblk_.get(), tol_.get(), R_.get(), m_, c,
                                              Du_, gJ, z, !omp_);
    });
    check(cudaGetLastError(), "sweep kernel");
  }

  Problem& P_;
  const Groups& grp_;
  const bool omp_;
  const Index NG_, m_, Du_;
  int gmax_ = 1;
  Index K_ = 0;
  GramView gd_{};
  Buffer<double> gram_, mx_, dblk_, tol_, R_, C_, Z_, gain_, A_, out_, cnew_, znew_, lj_, znorm_;
  Buffer<Index> wstart_, gsize_, dboff_, goff_, pos2col_, colsJ_, best_;
  Buffer<signed char> state_;
  std::vector<Index> host_dblk_off_, sel_cols_;
  std::vector<double> host_tol_, Lpacked_;
  std::vector<signed char> host_state_;
};

}  // namespace

SelectResult select_backward_device(Problem& P, const SelectOptions& opt, const double* gram, int device);

SelectResult select(Problem& P, const SelectOptions& opt, int device) {
  validate(P.groups(), P.D(), opt);
  if (device < 0 || device >= device_count())
    throw std::invalid_argument("CUDA device " + std::to_string(device) + " is not available (" +
                                std::to_string(device_count()) + " device(s) found)");
  DeviceGuard guard(device);
  const double* gram = P.raw_gram();
  if (opt.method == Method::Backward) return select_backward_device(P, opt, gram, device);
  DeviceForwardState S(P, gram, P.mean_x().data(), opt.method == Method::Omp, opt.rcond);
  return run_forward(P, opt, S);
}

}  // namespace lsp::cuda
