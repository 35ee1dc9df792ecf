// Joint selection over problems that share one channel index (docs/design.md,
// "Joint selection"). Forward/OMP keep one forward state per problem (forward.cpp)
// and pick the group of largest sum_r w_r gain_r(g); adding it is the usual
// Cholesky update in every problem where it is still active. Backward runs
// backward.cpp's elimination with one H_r per problem. A group degenerate in one
// problem gains nothing there and is never added to that problem's factor (its
// weights there are zero); a group degenerate in every problem is skipped.
#include "joint.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <memory>
#include <string>

#include "forward_state.hpp"

namespace lsp {
namespace {

using States = std::vector<std::unique_ptr<ForwardStateBase>>;

// The joint criterion of group g: sum_r w_r gain_r(g) over the problems where g is
// active; `live` tells whether it is active in any.
double joint_gain(const States& st, const std::vector<double>& w, Index g, bool& live) {
  double s = 0;  // one problem with w = 1: exactly its gain, so select's choices
  live = false;
  for (std::size_t r = 0; r < st.size(); ++r)
    if (st[r]->is_active(g)) {
      live = true;
      if (w[r] > 0) s += w[r] * st[r]->gain_of(g);
    }
  return s;
}

bool live_anywhere(const States& st, Index g) {
  for (const auto& s : st)
    if (s->is_active(g)) return true;
  return false;
}

// Best live group (ties: lowest index), -1 if none is left.
Index joint_best(const States& st, const std::vector<double>& w, Index NG) {
  Index b = -1;
  double best = 0;
  for (Index g = 0; g < NG; ++g) {
    bool live = false;
    const double s = joint_gain(st, w, g, live);
    if (live && (b < 0 || s > best)) {
      b = g;
      best = s;
    }
  }
  return b;
}

// Problem r's columns of the kept groups that are degenerate in it (zero weights there).
std::vector<Index> dead_kept_columns(const Groups& grp, const std::vector<Index>& degenerate,
                                     const std::vector<char>& chosen) {
  std::vector<Index> cols;
  for (Index g : degenerate)
    if (chosen[g]) cols.insert(cols.end(), &grp.columns[grp.offsets[g]], &grp.columns[grp.offsets[g + 1]]);
  return cols;
}

// After the time limit (forward/omp): the greedy prefix, then the live groups of largest current joint
// criterion up to `target` (ties: lowest index), and a fresh re-fit of every problem on the kept set
// (a singular one raises that problem's damping, as refit does). Mirrors forward.cpp's fill-up.
JointResult joint_fill_after_time_limit(const std::vector<Problem*>& probs, States& st, const std::vector<double>& w,
                                        Index target, JointResult&& res) {
  const Index NG = probs[0]->groups().size();
  std::vector<char> chosen(NG, 0);
  for (Index g : res.selected) chosen[g] = 1;
  std::vector<std::pair<double, Index>> cand;
  for (Index g = 0; g < NG; ++g) {
    bool live = false;
    const double s = chosen[g] ? 0.0 : joint_gain(st, w, g, live);
    if (live) cand.push_back({-s, g});
  }
  std::sort(cand.begin(), cand.end());
  std::vector<Index> keep = res.selected;
  for (std::size_t i = 0; i < cand.size() && Index(keep.size()) < target; ++i) {
    keep.push_back(cand[i].second);
    res.filled.push_back(cand[i].second);
  }
  res.selected = keep;
  res.kept_path.push_back(Index(keep.size()));
  res.stopped_early = Index(keep.size()) < target;
  for (std::size_t r = 0; r < probs.size(); ++r) {
    SelectResult& pr = res.problems[r];
    std::vector<double> path = std::move(pr.error_path);  // the prefix, in working units
    pr.skipped = st[r]->degenerate();
    st[r]->release();  // the re-fit's K x K factor must not come on top of the state
    SelectResult fin = refit(*probs[r], keep);
    probs[r]->to_caller_units(path, 2, 0);
    path.push_back(fin.error);
    fin.error_path = std::move(path);
    fin.selected = keep;
    fin.kept_path = res.kept_path;
    fin.skipped = std::move(pr.skipped);
    fin.filled = res.filled;
    fin.timed_out = true;
    fin.stopped_early = res.stopped_early;
    pr = std::move(fin);
  }
  return res;
}

// Forward / OMP; w: the ranking weights. Fills the per-problem paths and re-fits.
JointResult joint_forward(const std::vector<Problem*>& probs, const std::vector<double>& w,
                          const SelectOptions& opt) {
  const std::size_t R = probs.size();
  const Index NG = probs[0]->groups().size();
  JointResult res;
  res.problems.resize(R);
  States st;
  std::vector<double> E(R);
  double energy = 0;  // weighted; one problem with w = 1: exactly its energy
  for (std::size_t r = 0; r < R; ++r) {
    st.push_back(make_cpu_forward_state(*probs[r], opt));
    if (opt.n_keep >= 0) st[r]->reserve(largest_columns(probs[r]->groups(), opt.n_keep));
    E[r] = probs[r]->energy();
    energy += w[r] * E[r];
    res.problems[r].error_path.push_back(E[r]);
  }
  res.kept_path.push_back(0);
  std::vector<char> chosen(NG, 0);
  const Index target = opt.n_keep >= 0 ? opt.n_keep : NG;
  auto done = [&]() {
    if (Index(res.selected.size()) >= target) return true;
    double e = 0;
    for (std::size_t r = 0; r < R; ++r) e += w[r] * E[r];
    return opt.tol >= 0 && e <= opt.tol * energy;
  };
  auto take = [&](Index J) {
    for (std::size_t r = 0; r < R; ++r) {
      if (st[r]->is_active(J)) E[r] = std::max(E[r] - st[r]->add(J), 0.0);
      res.problems[r].error_path.push_back(E[r]);
      st[r]->after_step();
    }
    chosen[J] = 1;
    res.selected.push_back(J);
    res.kept_path.push_back(Index(res.selected.size()));
  };

  const auto start = std::chrono::steady_clock::now();
  for (auto& s : st) s->evaluate_all();
  for (Index J : opt.force)  // kept whatever their gain; degenerate everywhere -> skipped
    if (live_anywhere(st, J)) take(J);
  while (!done()) {
    if (out_of_time(opt, start)) {
      res.timed_out = true;
      break;
    }
    const Index J = joint_best(st, w, NG);
    if (J < 0) {
      res.stopped_early = opt.n_keep >= 0;
      break;
    }
    take(J);
  }
  for (Index g = 0; g < NG; ++g)
    if (!chosen[g] && !live_anywhere(st, g)) res.skipped.push_back(g);
  if (res.timed_out) return joint_fill_after_time_limit(probs, st, w, target, std::move(res));
  for (std::size_t r = 0; r < R; ++r) {
    SelectResult& pr = res.problems[r];
    pr.selected = res.selected;
    pr.kept_path = res.kept_path;
    pr.stopped_early = res.stopped_early;
    pr.skipped = st[r]->degenerate();
    finish_forward(*probs[r], *st[r], dead_kept_columns(probs[r]->groups(), pr.skipped, chosen), E[r], pr);
  }
  return res;
}

// Backward: the shared elimination (backward.cpp), then each problem's fresh re-fit.
JointResult joint_backward(const std::vector<Problem*>& probs, const std::vector<double>& w,
                           const SelectOptions& opt) {
  const EliminationPath path = backward_eliminate(probs, w, opt);
  JointResult res;
  res.removed = path.order;
  res.kept_path = path.kept_path;
  res.stopped_early = path.stopped_early;
  res.timed_out = path.timed_out;
  res.filled = path.filled;
  for (std::size_t r = 0; r < probs.size(); ++r)
    res.problems.push_back(backward_finish(*probs[r], path.removed, path.path_of(r)));
  res.selected = res.problems[0].selected;
  return res;
}

// Rethrows a validation error of problem r with its index in front.
template <class F>
void for_problem(std::size_t r, F&& check) {
  try {
    check();
  } catch (const NonFiniteInput& e) {
    throw NonFiniteInput("problem " + std::to_string(r) + ": " + e.what());
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument("problem " + std::to_string(r) + ": " + e.what());
  }
}

}  // namespace

void validate_joint(const std::vector<const Groups*>& groups, const std::vector<Index>& D,
                    const std::vector<double>& weights, const SelectOptions& opt) {
  const std::size_t R = groups.size();
  if (R == 0) throw std::invalid_argument("select_joint needs at least one problem");
  if (D.size() != R) throw std::invalid_argument("internal: one feature count per problem");
  for (std::size_t r = 0; r < R; ++r) for_problem(r, [&]() { validate_groups(*groups[r], D[r]); });
  for (std::size_t r = 1; r < R; ++r)
    if (groups[r]->size() != groups[0]->size())
      throw std::invalid_argument("problem " + std::to_string(r) + " has " + std::to_string(groups[r]->size()) +
                                  " groups but problem 0 has " + std::to_string(groups[0]->size()) +
                                  ": every problem needs one group per shared channel");
  validate(*groups[0], D[0], opt);  // the options depend on the group count only
  if (weights.empty()) return;
  if (weights.size() != R)
    throw std::invalid_argument("weights has " + std::to_string(weights.size()) + " entries; expected one per "
                                "problem (" + std::to_string(R) + ")");
  for (double v : weights)
    if (!(v >= 0) || !std::isfinite(v)) throw std::invalid_argument("weights must be finite and >= 0");
  if (*std::max_element(weights.begin(), weights.end()) <= 0)
    throw std::invalid_argument("at least one weight must be positive");
}

// The weights in the caller's units (reported, and what explicit weights mean) and in each
// problem's working units (which its gains are in; a rescaled problem's errors are 2^-2ey of the
// caller's): wu_r = w_r 2^(2 ey_r). Relative weights are wu_r = 1 / (working energy).
void joint_weights(const std::vector<Problem*>& probs, const std::vector<double>& weights, std::vector<double>& w,
                   std::vector<double>& wu) {
  w.clear();
  wu.clear();
  for (std::size_t r = 0; r < probs.size(); ++r) {
    const Problem* P = probs[r];
    const double unit = P->errors_to_caller(1.0);
    if (!weights.empty()) {
      w.push_back(weights[r]);
      wu.push_back(weights[r] * unit);
    } else {  // below the smallest normal double 1/energy would overflow; such targets are constant
      wu.push_back(P->energy() >= std::numeric_limits<double>::min() ? 1.0 / P->energy() : 0.0);
      w.push_back(wu.back() / unit);
    }
  }
}

JointResult select_joint(const std::vector<Problem*>& probs, const std::vector<double>& weights,
                         const SelectOptions& opt) {
  std::vector<const Groups*> groups;
  std::vector<Index> D;
  for (const Problem* P : probs) {
    if (!P) throw std::invalid_argument("internal: null problem");
    groups.push_back(&P->groups());
    D.push_back(P->D());
  }
  validate_joint(groups, D, weights, opt);
  std::vector<double> w, wu;
  joint_weights(probs, weights, w, wu);
  // The choices use w scaled so that its largest entry is 1: the same choices, and
  // with one problem exactly 1, so that select_joint({P}) is select(P) bit for bit.
  // All weights 0 (every target constant: the objective is 0 whatever is kept):
  // rank by the unweighted sum, which again is select's rule for one problem.
  const double wmax = *std::max_element(wu.begin(), wu.end());
  std::vector<double> rank(wu.size(), 1.0);
  if (wmax > 0)
    for (std::size_t r = 0; r < wu.size(); ++r) rank[r] = wu[r] / wmax;
  JointResult res = opt.method == Method::Backward ? joint_backward(probs, rank, opt) : joint_forward(probs, rank, opt);
  res.weights = w;
  res.energy = 0;
  for (std::size_t r = 0; r < probs.size(); ++r) res.energy += w[r] * probs[r]->errors_to_caller(probs[r]->energy());
  res.error_path.assign(res.kept_path.size(), 0.0);  // from the problems' paths (backward: last = re-fit)
  for (std::size_t r = 0; r < probs.size(); ++r)
    for (std::size_t k = 0; k < res.error_path.size(); ++k) res.error_path[k] += w[r] * res.problems[r].error_path[k];
  return res;
}

JointResult select_joint(const std::vector<ProblemInput>& inputs, const std::vector<Groups>& groups,
                         const std::vector<double>& weights, const SelectOptions& opt) {
  if (inputs.size() != groups.size()) throw std::invalid_argument("internal: one group set per problem");
  std::vector<const Groups*> gp;
  std::vector<Index> D;
  for (std::size_t r = 0; r < inputs.size(); ++r) {
    gp.push_back(&groups[r]);
    D.push_back(inputs[r].D);
  }
  validate_joint(gp, D, weights, opt);  // before any statistics are read
  // Problems are not movable (a rescaled one points into its own storage): one allocation each.
  std::vector<std::unique_ptr<Problem>> probs;
  for (std::size_t r = 0; r < inputs.size(); ++r)
    for_problem(r, [&]() { probs.push_back(std::make_unique<Problem>(inputs[r], groups[r])); });
  std::vector<Problem*> ptrs;
  for (auto& P : probs) ptrs.push_back(P.get());
  return select_joint(ptrs, weights, opt);
}

}  // namespace lsp
