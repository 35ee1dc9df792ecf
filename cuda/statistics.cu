// Streamed statistics on the GPU: G += x^T x (upper tiles), B += x^T y, and the
// first/second moments, from float16/bfloat16/float32/float64 device batches with
// any strides. Products are accumulated per batch in float32 (float64 for float64
// inputs) and added into float64 (or float32) sums. A batch with NaN/Inf is not
// added: a device flag set by the moment kernel gates every addition, so no host
// synchronisation is needed per batch; read() reports rejected batches.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common.cuh"
#include "lsprune/accumulate.hpp"
#include "lsprune_cuda.hpp"

namespace lsp::cuda {
namespace {

constexpr int TILE = 64, KC = 16;  // output tile 64 x 64, rows per shared-memory chunk

__device__ __forceinline__ float to_f(const void* p, int dt, Index i) {
  switch (dt) {
    case 0: return __half2float(static_cast<const __half*>(p)[i]);
    case 3: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case 2: return float(static_cast<const double*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}
__device__ __forceinline__ double to_d(const void* p, int dt, Index i) {
  return dt == 2 ? static_cast<const double*>(p)[i] : double(to_f(p, dt, i));
}

struct View {
  const void* p;
  int dt;
  Index rows, cols, rs, cs;
};

// Partial column sums and sums of squares (float64) of rows [chunk*len, ...).
__global__ void moments_kernel(View v, Index len, double* __restrict part_s, double* __restrict part_q) {
  const Index j = Index(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= v.cols) return;
  const Index r0 = Index(blockIdx.y) * len, r1 = v.rows < r0 + len ? v.rows : r0 + len;
  double s = 0, q = 0;
  for (Index r = r0; r < r1; ++r) {
    const double a = to_d(v.p, v.dt, r * v.rs + j * v.cs);
    s += a;
    q += a * a;
  }
  part_s[Index(blockIdx.y) * v.cols + j] = s;
  part_q[Index(blockIdx.y) * v.cols + j] = q;
}

// Sums the chunk partials in a fixed order; flags a non-finite batch.
__global__ void moments_reduce_kernel(Index cols, int chunks, const double* __restrict part_s,
                                      const double* __restrict part_q, double* __restrict s, double* __restrict q,
                                      int* __restrict bad) {
  const Index j = Index(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  double a = 0, b = 0;
  for (int c = 0; c < chunks; ++c) {
    a += part_s[c * cols + j];
    b += part_q[c * cols + j];
  }
  s[j] = a;
  q[j] = b;
  if (!isfinite(a) || !isfinite(b)) atomicOr(bad, 1);
}

// One 64 x 64 tile of U^T V over the rows of split blockIdx.y (U: N x du, V: N x dv).
// Acc: float for 16/32-bit inputs, double for float64. Writes the tile to `out`
// (ld = ldo) as partial (splits > 1) or adds it into the sums (Sum) when the batch is finite.
template <class Acc, class Sum>
__global__ void tile_kernel(View U, View V, Index len, bool upper_only, const int* __restrict bad,
                            Acc* __restrict partial, Sum* __restrict sums, Index ldo) {
  Index ti, tj;
  const Index nti = (U.cols + TILE - 1) / TILE;
  if (upper_only) {  // blockIdx.x enumerates tiles with ti <= tj
    Index t = blockIdx.x;
    ti = 0;
    Index row_len = nti;
    while (t >= row_len) { t -= row_len; ++ti; --row_len; }
    tj = ti + t;
  } else {
    ti = blockIdx.x % nti;
    tj = blockIdx.x / nti;
  }
  const Index i0 = ti * TILE, j0 = tj * TILE;
  const Index r0 = Index(blockIdx.y) * len, r1 = U.rows < r0 + len ? U.rows : r0 + len;
  __shared__ Acc As[KC][TILE], Bs[KC][TILE];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  Acc acc[4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) acc[a][b] = Acc(0);
  for (Index r = r0; r < r1; r += KC) {
    for (int t = threadIdx.x; t < KC * TILE; t += blockDim.x) {
      const int rr = t / TILE, cc = t % TILE;
      const Index row = r + rr;
      const bool ok = row < r1;
      As[rr][cc] = (ok && i0 + cc < U.cols) ? Acc(to_d(U.p, U.dt, row * U.rs + (i0 + cc) * U.cs)) : Acc(0);
      Bs[rr][cc] = (ok && j0 + cc < V.cols) ? Acc(to_d(V.p, V.dt, row * V.rs + (j0 + cc) * V.cs)) : Acc(0);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < KC; ++k) {
      Acc a[4], b[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        a[q] = As[k][ty * 4 + q];
        b[q] = Bs[k][tx * 4 + q];
      }
#pragma unroll
      for (int p = 0; p < 4; ++p)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[p][q] += a[p] * b[q];
    }
    __syncthreads();
  }
  const bool add_now = partial == nullptr;
  if (add_now && *bad) return;
#pragma unroll
  for (int p = 0; p < 4; ++p)
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const Index i = i0 + ty * 4 + p, j = j0 + tx * 4 + q;
      if (i >= U.cols || j >= V.cols) continue;
      if (add_now)
        sums[i * ldo + j] += Sum(acc[p][q]);
      else
        partial[Index(blockIdx.y) * U.cols * ldo + i * ldo + j] = acc[p][q];
    }
}

// sums += sum over splits of partial, in split order, unless the batch was flagged.
template <class Acc, class Sum>
__global__ void reduce_partial_kernel(Index n, Index ld, bool upper_only, int splits, const Acc* __restrict partial,
                                      Sum* __restrict sums, const int* __restrict bad) {
  const Index t = Index(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= n || *bad) return;
  if (upper_only && t / ld > t % ld) return;  // lower tiles were never written
  double s = 0;
  for (int c = 0; c < splits; ++c) s += double(partial[c * n + t]);
  sums[t] += Sum(s);
}

template <class Sum>
__global__ void add_moments_kernel(Index n, const double* __restrict s, Sum* __restrict acc, const int* __restrict bad) {
  const Index t = Index(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < n && !*bad) acc[t] += Sum(s[t]);
}

__global__ void finish_batch_kernel(int* __restrict bad, long long* __restrict rejected, long long rows) {
  if (*bad) {
    rejected[0] += 1;
    rejected[1] += rows;
  }
  *bad = 0;
}

View view_of(const DeviceMatrix& m) {
  if (m.dtype < 0 || m.dtype > 3) throw std::invalid_argument("unsupported device dtype");
  return View{reinterpret_cast<const void*>(m.data), m.dtype, m.rows, m.cols, m.row_stride, m.col_stride};
}

}  // namespace

struct DeviceStatistics::Impl {
  Index D, m;
  int device;
  bool f64;
  Buffer<double> G64, B64, sx, sy, syy, bs, bq, ps, pq, ys, yq;
  Buffer<float> G32, B32;
  Buffer<float> part32;
  Buffer<double> part64;
  Buffer<int> bad;
  Buffer<long long> rejected;
};

DeviceStatistics::DeviceStatistics(Index D, Index m, int device, bool float64_sums) : impl_(new Impl) {
  if (D <= 0 || m < 0) throw std::invalid_argument("bad statistics shape");
  if (device < 0 || device >= device_count())
    throw std::invalid_argument("CUDA device " + std::to_string(device) + " is not available");
  DeviceGuard guard(device);
  Impl& s = *impl_;
  s.D = D;
  s.m = m;
  s.device = device;
  s.f64 = float64_sums;
  if (s.f64) {
    s.G64.resize(std::size_t(D) * D);
    s.B64.resize(std::max<std::size_t>(1, std::size_t(D) * m));
  } else {
    s.G32.resize(std::size_t(D) * D);
    s.B32.resize(std::max<std::size_t>(1, std::size_t(D) * m));
  }
  for (auto* b : {&s.sx, &s.bs, &s.bq}) b->resize(D);
  for (auto* b : {&s.sy, &s.syy, &s.ys, &s.yq}) b->resize(std::max<Index>(1, m));
  s.bad.resize(1);
  s.rejected.resize(2);  // batches, rows
  reset();
}

DeviceStatistics::~DeviceStatistics() = default;
Index DeviceStatistics::D() const { return impl_->D; }
Index DeviceStatistics::m() const { return impl_->m; }
int DeviceStatistics::device() const { return impl_->device; }

void DeviceStatistics::reset() {
  Impl& s = *impl_;
  DeviceGuard guard(s.device);
  for (auto* b : {&s.G64, &s.B64, &s.sx, &s.sy, &s.syy})
    if (b->size()) b->zero();
  for (auto* b : {&s.G32, &s.B32})
    if (b->size()) b->zero();
  s.bad.zero();
  s.rejected.zero();
  check(cudaDeviceSynchronize(), "reset");
}

void DeviceStatistics::update(const DeviceMatrix& x, const DeviceMatrix* y, std::uintptr_t stream_handle) {
  Impl& s = *impl_;
  if (x.cols != s.D) throw std::invalid_argument("x has " + std::to_string(x.cols) + " columns; expected (N, " +
                                                 std::to_string(s.D) + ")");
  if ((s.m > 0) != (y != nullptr)) throw std::invalid_argument("y must be given exactly when n_targets > 0");
  if (y && (y->cols != s.m || y->rows != x.rows)) throw std::invalid_argument("y has the wrong shape");
  if (x.rows == 0) return;
  DeviceGuard guard(s.device);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream_handle);
  const View X = view_of(x);
  const bool f64_in = x.dtype == 2 || (y && y->dtype == 2);
  const Index N = x.rows;
  // moments (also the NaN/Inf gate)
  const int chunks = int(std::min<Index>(64, std::max<Index>(1, N / 1024)));
  const Index len = (N + chunks - 1) / chunks;
  // sized once for x and y: no reallocation between kernels in flight
  s.ps.resize(std::size_t(chunks) * std::max(s.D, s.m));
  s.pq.resize(std::size_t(chunks) * std::max(s.D, s.m));
  moments_kernel<<<dim3(blocks_for(s.D, 128), chunks), 128, 0, st>>>(X, len, s.ps.get(), s.pq.get());
  moments_reduce_kernel<<<blocks_for(s.D, 128), 128, 0, st>>>(s.D, chunks, s.ps.get(), s.pq.get(), s.bs.get(),
                                                              s.bq.get(), s.bad.get());
  View Y{};
  if (y) {
    Y = view_of(*y);
    moments_kernel<<<dim3(blocks_for(s.m, 128), chunks), 128, 0, st>>>(Y, len, s.ps.get(), s.pq.get());
    moments_reduce_kernel<<<blocks_for(s.m, 128), 128, 0, st>>>(s.m, chunks, s.ps.get(), s.pq.get(), s.ys.get(),
                                                                s.yq.get(), s.bad.get());
  }
  // products: enough row splits to fill the device when there are few tiles
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, s.device);
  auto run = [&](const View& U, const View& V, bool upper, Index ldo, auto* sums) {
    const Index ntu = (U.cols + TILE - 1) / TILE, ntv = (V.cols + TILE - 1) / TILE;
    const Index tiles = upper ? ntu * (ntu + 1) / 2 : ntu * ntv;
    int splits = int(std::max<Index>(1, std::min<Index>((N + 255) / 256, (2 * sms + tiles - 1) / tiles)));
    const Index rlen = (N + splits - 1) / splits;
    const Index n_out = U.cols * ldo;
    auto launch = [&](auto acc_tag) {
      using Acc = decltype(acc_tag);
      using Sum = std::remove_pointer_t<decltype(sums)>;
      Acc* part = nullptr;
      if (splits > 1) {
        if constexpr (std::is_same<Acc, float>::value) {
          s.part32.resize(std::size_t(splits) * n_out);
          part = s.part32.get();
        } else {
          s.part64.resize(std::size_t(splits) * n_out);
          part = s.part64.get();
        }
      }
      tile_kernel<Acc, Sum><<<dim3(unsigned(tiles), splits), 256, 0, st>>>(U, V, rlen, upper, s.bad.get(), part,
                                                                          sums, ldo);
      if (splits > 1)
        reduce_partial_kernel<Acc, Sum><<<blocks_for(n_out, 256), 256, 0, st>>>(n_out, ldo, upper, splits, part,
                                                                                sums, s.bad.get());
    };
    if (f64_in) launch(double()); else launch(float());
  };
  if (s.f64) {
    run(X, X, true, s.D, s.G64.get());
    if (y) run(X, Y, false, s.m, s.B64.get());
    add_moments_kernel<double><<<blocks_for(s.D, 256), 256, 0, st>>>(s.D, s.bs.get(), s.sx.get(), s.bad.get());
  } else {
    run(X, X, true, s.D, s.G32.get());
    if (y) run(X, Y, false, s.m, s.B32.get());
    add_moments_kernel<double><<<blocks_for(s.D, 256), 256, 0, st>>>(s.D, s.bs.get(), s.sx.get(), s.bad.get());
  }
  if (y) {
    add_moments_kernel<double><<<blocks_for(s.m, 256), 256, 0, st>>>(s.m, s.ys.get(), s.sy.get(), s.bad.get());
    add_moments_kernel<double><<<blocks_for(s.m, 256), 256, 0, st>>>(s.m, s.yq.get(), s.syy.get(), s.bad.get());
  }
  finish_batch_kernel<<<1, 1, 0, st>>>(s.bad.get(), s.rejected.get(), (long long)N);
  check(cudaGetLastError(), "statistics kernels");
}

Index DeviceStatistics::read(double* gram, double* cross, double* sum_x, double* sum_y, double* sum_yy,
                             Index* rejected_rows) {
  Impl& s = *impl_;
  DeviceGuard guard(s.device);
  check(cudaDeviceSynchronize(), "statistics");
  const std::size_t DD = std::size_t(s.D) * s.D, DM = std::size_t(s.D) * s.m;
  if (s.f64) {
    s.G64.download(gram, DD);
    if (DM) s.B64.download(cross, DM);
  } else {
    std::vector<float> tmp(std::max(DD, DM));
    s.G32.download(tmp.data(), DD);
    std::copy(tmp.begin(), tmp.begin() + DD, gram);
    if (DM) {
      s.B32.download(tmp.data(), DM);
      std::copy(tmp.begin(), tmp.begin() + DM, cross);
    }
  }
  mirror_upper(gram, s.D);
  s.sx.download(sum_x, s.D);
  if (s.m) {
    s.sy.download(sum_y, s.m);
    s.syy.download(sum_yy, s.m);
  }
  long long rej[2] = {0, 0};
  s.rejected.download(rej, 2);
  *rejected_rows = Index(rej[1]);
  return Index(rej[0]);
}

}  // namespace lsp::cuda
