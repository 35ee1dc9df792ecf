// The engine's damping rules (docs/design.md, "Damping policy"). Python's
// lsprune/_policy.py owns the policy and documents it; these values mirror it
// and tests/test_policy.py checks that both agree (through _core.damping_policy()).
#pragma once

#include <algorithm>

namespace lsp::policy {

// A singular system is refactorized with the relative damping raised
// 0 -> kEscalationStart, then x kEscalationFactor per try, up to kMaxDamping.
constexpr double kEscalationStart = 1e-8;
constexpr double kEscalationFactor = 100.0;
constexpr double kMaxDamping = 1e-1;

// The next relative damping to try after a breakdown at `rel`.
inline double escalate(double rel) { return rel > 0 ? rel * kEscalationFactor : kEscalationStart; }

// Absolute ridge lambda = damping * mean(diag Gc). A problem whose columns are all
// dead (mean_diag == 0) still gets a positive ridge so that it stays finite.
inline double ridge(double rel, double mean_diag) {
  const double lambda = rel * std::max(mean_diag, 0.0);
  return rel > 0 && lambda <= 0 ? rel : lambda;
}

// Swap refinement accepts an exchange only when it lowers the error by more than this
// fraction of the target energy: rounding cannot make it cycle between equal sets.
constexpr double kSwapRelTol = 1e-12;

}  // namespace lsp::policy
