// Host interface of the CUDA engine. No CUDA types here: cpp/ and src/ include
// this header whether or not the CUDA part was built (LSPRUNE_HAVE_CUDA).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "lsprune/common.hpp"
#include "lsprune/problem.hpp"

namespace lsp::cuda {

// Number of usable CUDA devices (0 without a driver or GPU; never throws).
int device_count();
std::string device_name(int device);

// Forward / OMP / backward selection with the solver state on `device` (same
// loop, validation and results as the CPU engine; see cuda/README.md for what
// runs where). Throws std::invalid_argument for unsupported inputs.
SelectResult select(Problem& prob, const SelectOptions& opt, int device);

// A strided matrix in device memory (element strides), as given by DLPack or
// __cuda_array_interface__. dtype: 0 float16, 1 float32, 2 float64, 3 bfloat16.
struct DeviceMatrix {
  std::uintptr_t data = 0;
  int dtype = 1;
  Index rows = 0, cols = 0, row_stride = 0, col_stride = 0;
};

// Streamed statistics accumulated on a device: G = sum x x^T (upper), B = sum x y^T,
// sums of x, y and y^2, in float64 (or float32) device buffers. update() only
// enqueues kernels on `stream` (no host synchronisation); a batch with NaN/Inf is
// not added and counted, and read() reports it.
class DeviceStatistics {
 public:
  DeviceStatistics(Index D, Index m, int device, bool float64_sums);
  ~DeviceStatistics();
  DeviceStatistics(const DeviceStatistics&) = delete;
  DeviceStatistics& operator=(const DeviceStatistics&) = delete;
  void update(const DeviceMatrix& x, const DeviceMatrix* y, std::uintptr_t stream);
  // Copies the sums to host float64 arrays (gram full symmetric D x D, cross D x m);
  // returns the number of rejected (non-finite) batches since the last reset and
  // their rows in *rejected_rows.
  Index read(double* gram, double* cross, double* sum_x, double* sum_y, double* sum_yy, Index* rejected_rows);
  void reset();
  Index D() const;
  Index m() const;
  int device() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace lsp::cuda
