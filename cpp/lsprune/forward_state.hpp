// The greedy forward/OMP loop, shared by the CPU engine and the CUDA engine: both
// provide the state (Cholesky/Schur factors, residuals, gains) behind this interface.
#pragma once

#include <memory>
#include <stdexcept>
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
  // The LS re-fit W^T (K x m, rows in the order of cols) on the selected columns: L^{-T} Z from
  // factors() unless the state has it more directly (the low-rank state).
  virtual void weights(std::vector<Index>& cols, std::vector<double>& Wt);
  virtual std::vector<Index> degenerate() = 0;
  // The current criterion of active group g (forward: its exact error drop; omp:
  // ||R_g||^2), read by the joint selection (cpp/lsprune/joint.cpp), which runs on
  // the CPU state only; the CUDA state keeps its gains on the device.
  virtual double gain_of(Index g) const { throw std::logic_error("internal: this forward state has no host gains"); }
  // Whether gain_of() works (the CPU state); the time limit's fill-up uses the gains then.
  virtual bool has_host_gains() const { return false; }
  // Frees the big buffers once the state is no longer needed (before a re-fit that needs the memory).
  virtual void release() {}
};

// The best group among those `active` says (-1 if none). Gains within kTie of the best (relative) are ties
// and go to the lowest index: the kernels round the updates of identical columns differently (by position,
// by the machine's BLAS kernels), which must not decide between a channel and its copy. All CPU states.
constexpr double kTie = 1e-10;
template <class Active>
Index best_group(Index n_groups, const double* gain, Active&& active) {
  double top = -1;
  for (Index g = 0; g < n_groups; ++g)
    if (active(g) && gain[g] > top) top = gain[g];
  for (Index g = 0; g < n_groups; ++g)
    if (active(g) && gain[g] >= top - kTie * top) return g;
  return -1;
}

// What every CPU state keeps per group and answers the same way: its state and its current criterion
// (host-side gains; forward: the exact error drop, omp: ||R_J||^2). The states fill both.
struct HostGainsState : ForwardStateBase {
  enum : char { ACTIVE = 0, CHOSEN = 1, DEGENERATE = 2 };
  std::vector<char> state;   // per group
  std::vector<double> gain;  // per group

  bool is_active(Index g) const override { return state[g] == ACTIVE; }
  double gain_of(Index g) const override { return gain[g]; }
  bool has_host_gains() const override { return true; }
  Index best() override {
    return best_group(Index(gain.size()), gain.data(), [&](Index g) { return state[g] == ACTIVE; });
  }
  std::vector<Index> degenerate() override {
    std::vector<Index> out;
    for (Index g = 0; g < Index(state.size()); ++g)
      if (state[g] == DEGENERATE) out.push_back(g);
    return out;
  }
};

// The CPU state (forward.cpp) for forward (omp = false) or OMP selection on `prob`.
std::unique_ptr<ForwardStateBase> make_forward_state(Problem& prob, bool omp, double rcond);

// The blocked CPU state (forward_blocked.cpp): dense D x D Schur complements updated by BLAS-3.
std::unique_ptr<ForwardStateBase> make_blocked_forward_state(Problem& prob, bool omp, double rcond);

// The low-rank CPU state (forward_lowrank.cpp) for statistics of few rows: the path in the r <= n
// dimensions of a pivoted-Cholesky factor of the Gram. Null when it does not apply: no ridge, a
// count that is not a number of rows, or a factor that does not represent the statistics to rounding.
std::unique_ptr<ForwardStateBase> make_lowrank_forward_state(Problem& prob, bool omp, double rcond);
// The rank bound of the centred Gram: the number of rows (less one with an intercept); -1 when the
// count is not a whole number.
Index lowrank_rank_bound(const Problem& prob);
// Whether the low-rank state is expected to be faster than the residual one (rank r; update = auto).
bool lowrank_forward_pays(Index Du, Index m, Index K, Index g, Index r);

// Whether the blocked state is expected to be faster than the residual one for Du candidate
// columns in groups of g, m targets and K columns to select, within the memory it allows itself
// (update = auto).
bool blocked_forward_pays(Index Du, Index m, Index K, Index g);

// The CPU state opt.update asks for (auto: blocked_forward_pays).
std::unique_ptr<ForwardStateBase> make_cpu_forward_state(Problem& prob, const SelectOptions& opt);

// Columns in the n largest groups: room for any kept set of n groups.
Index largest_columns(const Groups& groups, Index n);

// Runs forward selection / OMP on a state; fills the error path, the LS re-fit
// (W^T = L^{-T} Z, then finish()) and the flags. When opt.time_limit passes first, the
// greedy prefix is kept, the remaining n_keep - |prefix| groups are added at once by their
// current criterion (fill_after_time_limit) and the whole kept set is re-fitted.
SelectResult run_forward(Problem& P, const SelectOptions& opt, ForwardStateBase& S);

// The LS re-fit of a finished state (W^T = L^{-T} Z, then Problem::finish) with
// error E; `zero_cols` are kept columns outside the factor, which get zero weights.
void finish_forward(Problem& P, ForwardStateBase& S, const std::vector<Index>& zero_cols, double E,
                    SelectResult& res);

}  // namespace lsp
