// Joint selection over several least-squares problems that share one channel
// index (docs/design.md, "Joint selection"): the readers of one stream (a residual
// stream read by several layers, a producer feeding k consumers) must drop the
// same channels. Group g of every problem is shared channel g (its columns may
// differ per problem); the objective is sum_r w_r E_r(S) over one kept set S.
#pragma once

#include <vector>

#include "problem.hpp"

namespace lsp {

struct JointResult {
  std::vector<Index> selected;    // forward/omp: in the order chosen; backward: kept groups ascending
  std::vector<Index> removed;     // backward: in removal order
  std::vector<double> error_path; // sum_r w_r E_r at the start and after every step
  std::vector<Index> kept_path;   // number of groups kept at each error_path entry
  std::vector<Index> skipped;     // groups degenerate in every problem (never selectable), ascending
  bool stopped_early = false;     // n_keep could not be reached
  bool timed_out = false;         // time_limit stopped the greedy steps (see `filled`)
  std::vector<Index> filled;      // after time_limit: groups kept (forward/omp) or removed (backward) at once
  std::vector<double> weights;    // w_r used
  double energy = 0;              // sum_r w_r energy_r (0 -> relative errors are 0)
  // Per problem: its path (error_path = E_r, skipped = groups degenerate in it)
  // and the re-fit on the final kept set from its own statistics.
  std::vector<SelectResult> problems;
};

// Validates the joint inputs before any statistics are read (throws
// std::invalid_argument): at least one problem, every problem's groups and the
// options (validate), the same number of groups everywhere, and explicit weights
// (empty = relative; else one per problem, finite, >= 0, at least one > 0).
void validate_joint(const std::vector<const Groups*>& groups, const std::vector<Index>& D,
                    const std::vector<double>& weights, const SelectOptions& opt);

// The weights w_r of the objective, decided here only: explicit ones as given, or
// (empty) w_r = 1 / energy_r, so that each problem counts by its relative error and
// rescaling one problem's data changes nothing; a problem with zero energy (constant
// targets: its error is 0 whatever is kept) gets w_r = 0. Fills w (the caller's units) and
// wu (each problem's working units, see Problem: what its gains are ranked with).
void joint_weights(const std::vector<Problem*>& probs, const std::vector<double>& weights, std::vector<double>& w,
                   std::vector<double>& wu);

// forward / omp / backward over the problems (validated here); weights as in joint_weights.
JointResult select_joint(const std::vector<Problem*>& probs, const std::vector<double>& weights,
                         const SelectOptions& opt);
// The same from the raw inputs: validates everything, then builds the problems.
JointResult select_joint(const std::vector<ProblemInput>& inputs, const std::vector<Groups>& groups,
                         const std::vector<double>& weights, const SelectOptions& opt);

}  // namespace lsp
