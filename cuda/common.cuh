// CUDA helpers shared by the kernels of cuda/ (device side only).
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "lsprune/common.hpp"

namespace lsp::cuda {

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear a sticky launch error so the next call starts clean
    throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(e));
  }
}

// Owns a device allocation (cudaMalloc; never managed memory).
template <class T>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(std::size_t n) { resize(n); }
  ~Buffer() { release(); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  void resize(std::size_t n) {
    if (n <= cap_) { n_ = n; return; }
    release();
    check(cudaMalloc(&p_, std::max<std::size_t>(n, 1) * sizeof(T)), "cudaMalloc");
    cap_ = n_ = n;
  }
  // Grows keeping the first `keep` elements.
  void grow(std::size_t n, std::size_t keep) {
    if (n <= cap_) { n_ = n; return; }
    T* q = nullptr;
    check(cudaMalloc(&q, n * sizeof(T)), "cudaMalloc");
    if (keep) check(cudaMemcpy(q, p_, keep * sizeof(T), cudaMemcpyDeviceToDevice), "grow copy");
    release();
    p_ = q;
    cap_ = n_ = n;
  }
  void upload(const T* h, std::size_t n, std::size_t off = 0) {
    check(cudaMemcpy(p_ + off, h, n * sizeof(T), cudaMemcpyHostToDevice), "upload");
  }
  void download(T* h, std::size_t n, std::size_t off = 0) const {
    check(cudaMemcpy(h, p_ + off, n * sizeof(T), cudaMemcpyDeviceToHost), "download");
  }
  void zero() { check(cudaMemset(p_, 0, n_ * sizeof(T)), "memset"); }
  T* get() { return p_; }
  const T* get() const { return p_; }
  std::size_t size() const { return n_; }

 private:
  void release() {
    if (p_) cudaFree(p_);
    p_ = nullptr;
    cap_ = n_ = 0;
  }
  T* p_ = nullptr;
  std::size_t n_ = 0, cap_ = 0;
};

// Makes `device` current for the scope (and restores the previous one).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cudaGetDevice(&prev_);
    check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(prev_); }

 private:
  int prev_ = 0;
};

inline unsigned blocks_for(Index n, int threads) { return unsigned((n + threads - 1) / threads); }

// In-place Cholesky of a small row-major gs x gs block (one thread; the lower
// factor overwrites the lower triangle). False when a pivot is <= tol[j] (tol may
// be null: > 0) or not finite, as in the CPU engine.
__device__ inline bool small_cholesky(double* L, int gs, const double* tol) {
  for (int j = 0; j < gs; ++j) {
    double d = L[j * gs + j];
    for (int k = 0; k < j; ++k) d -= L[j * gs + k] * L[j * gs + k];
    if (!(d > (tol ? tol[j] : 0.0)) || !isfinite(d)) return false;
    d = sqrt(d);
    L[j * gs + j] = d;
    for (int i = j + 1; i < gs; ++i) {
      double s = L[i * gs + j];
      for (int k = 0; k < j; ++k) s -= L[i * gs + k] * L[j * gs + k];
      L[i * gs + j] = s / d;
    }
  }
  return true;
}

// Sum over the block in a fixed order (deterministic); part has blockDim.x entries,
// blockDim.x a power of two. Every thread must call it; thread 0 gets the result.
__device__ inline double block_sum(double v, double* part) {
  part[threadIdx.x] = v;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  return part[0];
}

}  // namespace lsp::cuda
