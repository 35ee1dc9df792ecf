// Dense g x g helpers for the per-group blocks (g is small: 1, 9, 49 ...).
#pragma once

#include <cmath>

#include "common.hpp"

namespace lsp::small {

// In-place Cholesky of a row-major symmetric g x g matrix (lower factor written
// into the lower triangle). Returns false when a pivot is <= tol[i] (or not
// finite): the block is numerically singular.
inline bool cholesky(double* a, Index g, const double* tol) {
  for (Index j = 0; j < g; ++j) {
    double d = a[j * g + j];
    for (Index k = 0; k < j; ++k) d -= a[j * g + k] * a[j * g + k];
    if (!(d > tol[j]) || !std::isfinite(d)) return false;
    d = std::sqrt(d);
    a[j * g + j] = d;
    for (Index i = j + 1; i < g; ++i) {
      double s = a[i * g + j];
      for (Index k = 0; k < j; ++k) s -= a[i * g + k] * a[j * g + k];
      a[i * g + j] = s / d;
    }
  }
  return true;
}

// Solves L X = B in place (L lower g x g from cholesky, B g x n with stride ldb).
inline void solve_lower(const double* L, Index g, double* B, Index n, Index ldb) {
  for (Index i = 0; i < g; ++i) {
    double* bi = B + i * ldb;
    for (Index k = 0; k < i; ++k) {
      const double l = L[i * g + k];
      const double* bk = B + k * ldb;
      for (Index j = 0; j < n; ++j) bi[j] -= l * bk[j];
    }
    const double inv = 1.0 / L[i * g + i];
    for (Index j = 0; j < n; ++j) bi[j] *= inv;
  }
}

}  // namespace lsp::small
