// The greedy forward/OMP loop, shared by the CPU engine and the CUDA engine: both
// provide the state (Cholesky/Schur factors, residuals, gains) behind this interface.
#pragma once

#include <vector>

#include "problem.hpp"

namespace lsp {

class ForwardStateBase {
 public:
  virtual ~ForwardStateBase() = default;
  // Room for `cols` selected columns (avoids regrowth copies).
  virtual void reserve(Index cols) = 0;
  // Gains of every group from the initial state (marks degenerate ones).
  virtual void evaluate_all() = 0;
  virtual bool is_active(Index g) const = 0;
  // Best active group (ties: lowest index), -1 if none is left.
  virtual Index best() = 0;
  // Adds group J (active) and updates every live group; returns the error drop ||z||^2.
  virtual double add(Index J) = 0;
  virtual void after_step() {}
  // Results: selected columns in selection order, the factor L (K x K lower,
  // row-major, dense) and Z (K x m) with W^T = L^{-T} Z, the degenerate groups.
  virtual Index selected_columns() const = 0;
  virtual void factors(std::vector<Index>& cols, std::vector<double>& L, std::vector<double>& Z) = 0;
  virtual std::vector<Index> degenerate() = 0;
};

// Runs forward selection / OMP on a state; fills the error path, the LS re-fit
// (W^T = L^{-T} Z, then finish()) and the flags.
SelectResult run_forward(Problem& P, const SelectOptions& opt, ForwardStateBase& S);

}  // namespace lsp
