// LS factorization (reduced-rank regression), the thesis' other fast method:
// replace W by a rank-r product U V fitted on the same statistics.
#pragma once

#include <vector>

#include "problem.hpp"

namespace lsp {

struct FactorizeResult {
  Index rank = 0;
  std::vector<double> U;           // m x rank, orthonormal columns
  std::vector<double> V;           // rank x D
  std::vector<double> bias;        // m
  std::vector<double> error_path;  // ridge objective for rank 0 .. min(m, D)
  double energy = 0, damping = 0, lambda = 0;
};

// With Gd = Gc + lambda I and the full LS fit W* = Bc^T Gd^{-1}, the best rank-r
// weights are P_r W* where P_r projects onto the top-r eigenvectors of
// M = Bc^T Gd^{-1} Bc (the fitted targets' scatter); E(r) = energy - sum of the
// r largest eigenvalues of M, so one eigen-decomposition gives every rank.
// rank < 0: choose the smallest rank whose relative error is <= tol.
FactorizeResult factorize(Problem& prob, Index rank, double tol);

}  // namespace lsp
