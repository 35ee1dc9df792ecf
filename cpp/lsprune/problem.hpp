// The centred, damped least-squares problem of one layer, built from streamed
// sums (or raw matrices), and the options/results shared by all solvers.
//
// Notation (docs/design.md, "Streamed statistics"): G = sum x x^T (D x D), B = sum x y^T (D x m).
// With an intercept everything is centred: Gc = G - sx sx^T / n,
// Bc = B - sx sy^T / n, energy = sum ||y||^2 - ||sy||^2 / n. Damping adds
// lambda = damping * mean(diag Gc over the candidate columns) to the diagonal;
// every reported error is the ridge objective ||Y - X W^T - b||^2 + lambda ||W||^2,
// which is the plain residual energy when damping = 0.
#pragma once

#include <chrono>
#include <functional>
#include <string>
#include <vector>

#include "common.hpp"
#include "policy.hpp"

namespace lsp {

struct ProblemInput {
  Index D = 0, m = 0;
  const double* gram = nullptr;        // D x D, symmetric, row-major
  const double* cross = nullptr;       // D x m (null in independent mode)
  const double* weights_in = nullptr;  // m x D: targets y = W x + b (independent mode)
  const double* bias_in = nullptr;     // m, optional with weights_in
  const double* sum_x = nullptr;       // D (needed when fit_intercept)
  const double* sum_y = nullptr;       // m (needed when fit_intercept and cross given)
  double target_energy = 0;            // sum ||y||^2 (uncentred); ignored with weights_in
  double count = 0;                    // number of samples
  bool fit_intercept = true;
  double damping = 1e-6;               // relative to mean(diag Gc)
};

// Candidate groups: groups[g] = original column indices (disjoint). Columns in
// no group are not candidates and are never kept.
struct Groups {
  std::vector<Index> offsets;  // n_groups + 1
  std::vector<Index> columns;  // concatenated
  Index size() const { return Index(offsets.size()) - 1; }
  Index size_of(Index g) const { return offsets[g + 1] - offsets[g]; }
  Index max_size() const;
  static Groups consecutive(Index D, Index group_size);
};

enum class Method { Forward, Omp, Backward };
// How the CPU forward/omp state is kept: the D x m residual updated every step (Residual), dense D x D
// Schur complements updated in blocks (Blocked), the r-dimensional factor of a Gram of few rows
// (LowRank), or whichever a cost model expects to be faster (Auto).
enum class Update { Auto, Residual, Blocked, LowRank };

struct SelectOptions {
  Method method = Method::Forward;
  Index n_keep = -1;           // number of groups to keep, or -1 when tol is used
  double tol = -1;             // stop at this relative error, or -1
  std::vector<Index> force;    // groups that must be kept (forward/omp: chosen first, in this order)
  double rcond = 1e-10;        // a pivot below rcond * (its damped variance) marks a group degenerate
  Index refine = 0;            // at most this many swap-refinement exchanges after the selection
  double time_limit = -1;      // seconds for the greedy steps (n_keep only), or -1: no limit
  Update update = Update::Auto;  // forward/omp on the CPU: how the state is kept (same choices)
};

struct SelectResult {
  std::vector<Index> selected;    // forward/omp: in the order chosen; backward: kept groups ascending
  std::vector<Index> removed;     // backward: in removal order
  std::vector<double> error_path; // error at the start and after every step
  std::vector<Index> kept_path;   // number of groups kept at each error_path entry
  std::vector<Index> skipped;     // groups found degenerate (dead / dependent), ascending
  bool stopped_early = false;     // n_keep could not be reached (all candidates degenerate)
  bool timed_out = false;         // time_limit stopped the greedy steps (see `filled`)
  std::vector<Index> filled;      // after time_limit: groups kept (forward/omp) or removed (backward) at once
  std::vector<Index> columns;     // original columns of the kept groups, ascending
  std::vector<double> weights;    // m x |columns| row-major, the LS re-fit on those columns
  std::vector<double> bias;       // m
  double error = 0;               // ridge objective of the returned weights
  double plain_error = 0;         // residual energy without the ridge term
  double energy = 0;              // centred target energy (0 -> relative errors are 0)
  double damping = 0;             // relative damping actually used (can grow on breakdown)
  double lambda = 0;              // absolute ridge added to the diagonal
  std::vector<Index> swapped_out, swapped_in;  // swap refinement: the exchanges, in order
};

// Centred, damped working view of a problem restricted to a universe of columns.
// Units: when the largest Gram diagonal or the target energy lies outside
// 2^[-range::kUnitBand, kUnitBand], the problem works on x 2^-ex and y 2^-ey (powers of two,
// exact; docs/design.md, "Numerics: scale"): every accessor below is in those working units,
// and finish()/to_caller_units() convert results back, so selections do not depend on scale.
class Problem {
 public:
  Problem(const ProblemInput& in, const Groups& groups);
  // Not copyable: in_.gram may point into the problem's own gram_units_.
  Problem(const Problem&) = delete;
  Problem& operator=(const Problem&) = delete;

  Index D() const { return D_; }
  Index m() const { return m_; }
  const Groups& groups() const { return groups_; }
  double energy() const { return energy_; }
  double lambda() const { return lambda_; }
  double damping() const { return damping_; }
  // Changes the relative damping (used to recover from a breakdown).
  void set_damping(double rel);
  bool fit_intercept() const { return in_.fit_intercept; }
  double count() const { return in_.count; }
  const double* raw_gram() const { return in_.gram; }  // uncentred, undamped D x D (working units)
  const std::vector<double>& mean_x() const { return mx_; }  // zeros without intercept

  // out[p] = Gd[j, cols[p]] for p < n (centred, damped Gram entry).
  void gram_row(Index j, const Index* cols, Index n, double* out) const;
  double gram_diag(Index j) const;  // Gd[j, j]
  // Centred cross row Bc[j, :] (m values).
  const double* cross_row(Index j) const { return &Bc_[std::size_t(j) * m_]; }

  // Fills weights/bias/columns/error/plain_error of `res` from W^T (K x m, rows
  // in the order of `cols`), reordering to ascending columns.
  void finish(const std::vector<Index>& cols, const std::vector<double>& Wt, double ridge_error,
              SelectResult& res) const;
  // Intercept my - U V mx of a factorized layer (U: m x r, V: r x D); zeros without intercept.
  std::vector<double> intercept(const std::vector<double>& U, const std::vector<double>& V, Index r) const;

  // Working -> caller units (exact): weights (y per x), targets (bias), errors/energies (y^2), ridge (x^2).
  void to_caller_units(std::vector<double>& v, int y_power, int x_power) const;
  double errors_to_caller(double e) const;
  double to_caller_ridge(double lambda) const;

 private:
  void normalize_units();
  bool few_rows_cross(const double* W);
  ProblemInput in_;
  Groups groups_;
  Index D_, m_;
  std::vector<double> mx_;  // sum_x / n (zeros without intercept)
  std::vector<double> Bc_;  // D x m centred cross (all rows; independent mode: Gc W^T)
  std::vector<double> my_;  // mean target
  double energy_ = 0, mean_diag_ = 0, damping_ = 0, lambda_ = 0;
  int ex_ = 0, ey_ = 0;            // working units: x 2^-ex_, y 2^-ey_
  std::vector<double> gram_units_;  // the Gram in working units (only when ex_ != 0)
};

// Pivoted Cholesky of a PSD n x n matrix A given by its diagonal `diag` and rows (row(q, out) writes row q):
// A = Lt Lt^T to rounding, Lt n x r (row-major) with r <= rmax steps of O(n r) (forward_lowrank.cpp).
// `piv` gets the pivots; Lt restricted to them is lower triangular. Returns r, or -1 when the trace it
// leaves out is above 1e-5 of A's (the rounding of float32 products; docs/design.md, "Low-rank forward
// state").
Index pivoted_cholesky(Index n, Index rmax, const std::function<void(Index, double*)>& row, std::vector<double> diag,
                       std::vector<double>& Lt, std::vector<Index>& piv);
// The rank bound of the centred Gram of `count` rows (one less with an intercept); -1 when the count is not
// a whole number.
Index rows_rank_bound(double count, bool fit_intercept);

// Calls try_factor() (which rebuilds the damped matrix from `prob` and returns a
// LAPACK info) until it succeeds, raising the relative damping by policy::escalate
// (0 -> 1e-8 -> x100 ... up to 0.1) on a singular system; the damping used is
// reported to the user.
template <class F>
void factor_or_raise_damping(Problem& prob, F&& try_factor, const char* what) {
  double rel = prob.damping();
  while (try_factor() != 0) {
    rel = policy::escalate(rel);
    if (rel > policy::kMaxDamping) throw NumericalError(std::string(what) + " stays singular even with damping 0.1");
    prob.set_damping(rel);
  }
}

// Validates the groups: well-formed offsets, non-empty, disjoint, columns in
// [0, D) (throws std::invalid_argument). Problem's constructor calls it.
void validate_groups(const Groups& groups, Index D);
// Validates groups and options against the problem (throws std::invalid_argument).
void validate(const Groups& groups, Index D, const SelectOptions& opt);

// LS re-fit on the given groups (any order; result ascending; the groups were
// validated by Problem). Recovers from a singular system by raising the damping
// (reported in res.damping).
SelectResult refit(Problem& prob, const std::vector<Index>& keep_groups);

// Whether opt.time_limit (seconds) has passed since `start` (never when it is -1).
bool out_of_time(const SelectOptions& opt, std::chrono::steady_clock::time_point start);

SelectResult select_forward(Problem& prob, const SelectOptions& opt);   // forward and omp

// Backward elimination's shared pieces (CPU and CUDA): the start (H = Gd^{-1} as a
// full symmetric matrix over the candidate columns in group order, W = H Bc, the
// ridge objective E of all columns) and the finish (fresh re-fit on the kept groups;
// the last path entry becomes its error).
struct BackwardStart {
  std::vector<double> H, W;
  double E = 0;
};
BackwardStart backward_start(Problem& prob, const SelectOptions& opt);
SelectResult backward_finish(Problem& prob, const std::vector<char>& removed, SelectResult&& path);
// The removal path of backward elimination over problems that share their groups
// (one problem with w = {1}: select's backward; several: the joint selection,
// joint.cpp): removes the group of least weighted cost sum_r w_r cost_r(g) and
// downdates every problem's H_r.
struct EliminationPath {
  std::vector<char> removed;                     // per group
  std::vector<Index> order;                      // removal order
  std::vector<Index> kept_path;                  // groups kept at each path entry
  std::vector<std::vector<double>> error_paths;  // per problem: its error at each entry
  bool stopped_early = false;
  bool timed_out = false;                        // time_limit: the rest was removed at once (`filled`)
  std::vector<Index> filled;
  SelectResult path_of(std::size_t r) const;     // problem r's path, for backward_finish
};
EliminationPath backward_eliminate(const std::vector<Problem*>& probs, const std::vector<double>& w,
                                   const SelectOptions& opt);
SelectResult select_backward(Problem& prob, const SelectOptions& opt);
SelectResult select(Problem& prob, const SelectOptions& opt);
// Swap refinement of a finished selection (force respected): at most max_swaps best-improvement
// exchanges of one kept group for one candidate, each appended to the error path, then a fresh
// re-fit on the refined set (docs/design.md, "Swap refinement").
SelectResult refine_swaps(Problem& prob, SelectResult&& res, const SelectOptions& opt, Index max_swaps);

}  // namespace lsp
