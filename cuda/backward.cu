// Backward elimination with H (Du x Du, full symmetric) and W (Du x m) on the GPU.
// H = Gd^{-1} is formed on the host by LAPACK (O(D^3) once, the same code as the
// CPU engine); every removal step runs on the device: one block per group
// computes its cost tr(W_g^T H_gg^{-1} W_g), a fixed-order reduction picks the
// cheapest (ties: lowest index), then rank-g downdates of W and H.
#include <algorithm>
#include <cmath>
#include <limits>

#include "common.cuh"
#include "lsprune/small.hpp"
#include "lsprune_cuda.hpp"

namespace lsp::cuda {
namespace {

constexpr int kMaxGroup = 49;

__global__ void cost_kernel(const signed char* __restrict skip, const Index* __restrict goff,
                            const double* __restrict H, Index Du, const double* __restrict W, Index m,
                            double* __restrict cost) {
  const Index g = blockIdx.x;
  if (skip[g]) return;
  const Index p = goff[g];
  const int gs = int(goff[g + 1] - p);
  __shared__ double L[kMaxGroup * kMaxGroup];
  __shared__ double part[256];
  __shared__ int bad;
  for (int t = threadIdx.x; t < gs * gs; t += blockDim.x) L[t] = H[(p + t / gs) * Du + p + t % gs];
  __syncthreads();
  if (threadIdx.x == 0) bad = !small_cholesky(L, gs, nullptr);
  __syncthreads();
  if (bad) {  // cannot happen for a positive definite H: never remove such a group
    if (threadIdx.x == 0) cost[g] = INFINITY;
    return;
  }
  double s = 0.0;
  for (Index k = threadIdx.x; k < m; k += blockDim.x) {
    double x[kMaxGroup];
    for (int a = 0; a < gs; ++a) {
      double v = W[(p + a) * m + k];
      for (int q = 0; q < a; ++q) v -= L[a * gs + q] * x[q];
      x[a] = v / L[a * gs + a];
      s += x[a] * x[a];
    }
  }
  const double total = block_sum(s, part);
  if (threadIdx.x == 0) cost[g] = total;
}

// Cheapest removable group (ties: lowest index), -1 if none.
__global__ void argmin_kernel(const signed char* __restrict skip, const double* __restrict cost, Index NG,
                              Index* __restrict out) {
  __shared__ double bv[1024];
  __shared__ Index bi[1024];
  double v = INFINITY;
  Index idx = -1;
  for (Index g = threadIdx.x; g < NG; g += blockDim.x)
    if (!skip[g] && isfinite(cost[g]) && (idx < 0 || cost[g] < v)) { v = cost[g]; idx = g; }
  bv[threadIdx.x] = v;
  bi[threadIdx.x] = idx;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) {
      const Index j = bi[threadIdx.x + w], i = bi[threadIdx.x];
      const double u = bv[threadIdx.x + w];
      if (j >= 0 && (i < 0 || u < bv[threadIdx.x] || (u == bv[threadIdx.x] && j < i))) {
        bv[threadIdx.x] = u;
        bi[threadIdx.x] = j;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = bi[0];
}

// Vt = MJ^{-1} H[J, :] (gJ x Du), Y = MJ^{-1} W_J (gJ x m): thread per column.
__global__ void solve_rows_kernel(const double* __restrict Src, Index ld, Index p0, int gJ, Index n,
                                  const double* __restrict M, double* __restrict out) {
  const Index c = Index(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= n) return;
  double x[kMaxGroup];
  for (int i = 0; i < gJ; ++i) {
    double v = Src[(p0 + i) * ld + c];
    for (int q = 0; q < i; ++q) v -= M[i * gJ + q] * x[q];
    x[i] = v / M[i * gJ + i];
    out[i * n + c] = x[i];
  }
}

// T[a, b] -= sum_i U[i, a] V[i, b] for a < rows, b < cols (rank-gJ downdate).
__global__ void downdate_kernel(double* __restrict T, Index ldt, Index rows, Index cols,
                                const double* __restrict U, Index ldu, const double* __restrict V, Index ldv,
                                int gJ) {
  const Index b = Index(blockIdx.x) * blockDim.x + threadIdx.x;
  const Index a = blockIdx.y;
  if (b >= cols || a >= rows) return;
  double s = 0.0;
  for (int i = 0; i < gJ; ++i) s += U[i * ldu + a] * V[i * ldv + b];
  T[a * ldt + b] -= s;
}

}  // namespace

SelectResult select_backward_device(Problem& P, const SelectOptions& opt, const double*, int) {
  const Groups& grp = P.groups();
  const Index NG = grp.size(), m = P.m(), Du = Index(grp.columns.size());
  if (grp.max_size() > kMaxGroup)
    throw std::invalid_argument("the CUDA engine handles groups of at most " + std::to_string(kMaxGroup) +
                                " columns; use device='cpu' for larger groups");
  BackwardStart start = backward_start(P, opt);  // host LAPACK: H = Gd^{-1}, W = H Bc
  Buffer<double> H(std::size_t(Du) * Du), W(std::size_t(Du) * m), cost(NG), Vt, Y, MJd;
  H.upload(start.H.data(), start.H.size());
  W.upload(start.W.data(), start.W.size());
  start.H.clear();
  start.H.shrink_to_fit();
  std::vector<char> removed(NG, 0);
  std::vector<signed char> skip(NG, 0);
  for (Index g : opt.force) skip[g] = 1;
  Buffer<signed char> skip_d(NG);
  skip_d.upload(skip.data(), NG);
  Buffer<Index> goff(NG + 1), best(1);
  goff.upload(grp.offsets.data(), NG + 1);

  SelectResult res;
  double E = start.E;
  const double energy = P.energy();
  res.error_path.push_back(E);
  res.kept_path.push_back(NG);
  Index kept = NG;
  const Index target = opt.n_keep >= 0 ? opt.n_keep : 0;
  std::vector<double> hJ;
  while (kept > target) {
    cost_kernel<<<unsigned(NG), 128>>>(skip_d.get(), goff.get(), H.get(), Du, W.get(), m, cost.get());
    argmin_kernel<<<1, 1024>>>(skip_d.get(), cost.get(), NG, best.get());
    check(cudaGetLastError(), "backward cost kernels");
    Index J = -1;
    best.download(&J, 1);
    if (J < 0) {
      res.stopped_early = opt.n_keep >= 0;
      break;
    }
    double cJ = 0;
    cost.download(&cJ, 1, J);
    if (opt.tol >= 0 && E + cJ > opt.tol * energy) break;
    const Index gJ = grp.size_of(J), pj = grp.offsets[J];
    std::vector<double> MJ(gJ * gJ), zero(gJ, 0.0);
    for (Index a = 0; a < gJ; ++a) H.download(&MJ[a * gJ], gJ, std::size_t(pj + a) * Du + pj);
    small::cholesky(MJ.data(), gJ, zero.data());
    MJd.resize(MJ.size());
    MJd.upload(MJ.data(), MJ.size());
    Vt.resize(std::size_t(gJ) * Du);
    Y.resize(std::size_t(gJ) * m);
    solve_rows_kernel<<<blocks_for(Du, 128), 128>>>(H.get(), Du, pj, int(gJ), Du, MJd.get(), Vt.get());
    solve_rows_kernel<<<blocks_for(m, 128), 128>>>(W.get(), m, pj, int(gJ), m, MJd.get(), Y.get());
    // W -= Vt^T Y ; H -= Vt^T Vt (full matrix; removed rows/cols are never read again)
    downdate_kernel<<<dim3(blocks_for(m, 128), unsigned(Du)), 128>>>(W.get(), m, Du, m, Vt.get(), Du, Y.get(), m,
                                                                     int(gJ));
    downdate_kernel<<<dim3(blocks_for(Du, 128), unsigned(Du)), 128>>>(H.get(), Du, Du, Du, Vt.get(), Du, Vt.get(),
                                                                      Du, int(gJ));
    check(cudaGetLastError(), "backward downdate kernels");
    E += cJ;
    removed[J] = 1;
    const signed char one = 1;
    skip_d.upload(&one, 1, J);
    --kept;
    res.removed.push_back(J);
    res.error_path.push_back(E);
    res.kept_path.push_back(kept);
  }
  check(cudaDeviceSynchronize(), "backward");
  return backward_finish(P, removed, std::move(res));
}

}  // namespace lsp::cuda
