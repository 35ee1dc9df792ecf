#include "problem.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "blas.hpp"

namespace lsp {

Index Groups::max_size() const {
  Index g = 0;
  for (Index i = 0; i < size(); ++i) g = std::max(g, size_of(i));
  return g;
}

Groups Groups::consecutive(Index D, Index group_size) {
  if (group_size <= 0) throw std::invalid_argument("group_size must be a positive integer");
  if (D % group_size != 0)
    throw std::invalid_argument("n_features (" + std::to_string(D) + ") is not a multiple of group_size (" +
                                std::to_string(group_size) + ")");
  Groups g;
  Index n = D / group_size;
  g.offsets.resize(n + 1);
  for (Index i = 0; i <= n; ++i) g.offsets[i] = i * group_size;
  g.columns.resize(D);
  std::iota(g.columns.begin(), g.columns.end(), Index(0));
  return g;
}

void validate_groups(const Groups& groups, Index D) {
  const auto& off = groups.offsets;
  if (off.empty() || off.front() != 0 || off.back() != Index(groups.columns.size()))
    throw std::invalid_argument("internal: malformed group offsets");
  for (std::size_t i = 1; i < off.size(); ++i)
    if (off[i] < off[i - 1]) throw std::invalid_argument("internal: malformed group offsets");
  const Index G = groups.size();
  if (G <= 0) throw std::invalid_argument("there are no candidate groups");
  std::vector<char> seen(D, 0);
  for (Index g = 0; g < G; ++g) {
    if (groups.size_of(g) <= 0) throw std::invalid_argument("group " + std::to_string(g) + " is empty");
    for (Index k = groups.offsets[g]; k < groups.offsets[g + 1]; ++k) {
      Index c = groups.columns[k];
      if (c < 0 || c >= D)
        throw std::invalid_argument("group " + std::to_string(g) + " has column " + std::to_string(c) +
                                    " outside [0, " + std::to_string(D) + ")");
      if (seen[c]) throw std::invalid_argument("column " + std::to_string(c) + " appears in more than one group");
      seen[c] = 1;
    }
  }
}

void validate(const Groups& groups, Index D, const SelectOptions& opt) {
  validate_groups(groups, D);
  const Index G = groups.size();
  const bool has_n = opt.n_keep >= 0, has_tol = opt.tol >= 0;
  if (has_n == has_tol) throw std::invalid_argument("give exactly one of n_keep and tol");
  if (has_n && opt.n_keep > G)
    throw std::invalid_argument("n_keep=" + std::to_string(opt.n_keep) + " is out of range [0, " +
                                std::to_string(G) + "] (number of groups)");
  if (has_tol && !(opt.tol <= 1.0)) throw std::invalid_argument("tol must be in [0, 1]");
  std::vector<char> f(G, 0);
  for (Index g : opt.force) {
    if (g < 0 || g >= G)
      throw std::invalid_argument("force contains group " + std::to_string(g) + " outside [0, " +
                                  std::to_string(G) + ")");
    if (f[g]) throw std::invalid_argument("force contains group " + std::to_string(g) + " twice");
    f[g] = 1;
  }
  if (has_n && Index(opt.force.size()) > opt.n_keep)
    throw std::invalid_argument("force names " + std::to_string(opt.force.size()) + " groups but n_keep is " +
                                std::to_string(opt.n_keep));
  if (!(opt.rcond >= 0)) throw std::invalid_argument("rcond must be >= 0");
  if (!(opt.time_limit == -1 || (opt.time_limit > 0 && std::isfinite(opt.time_limit))))
    throw std::invalid_argument("time_limit must be a positive number of seconds (or -1: none)");
  if (opt.time_limit > 0 && has_tol) throw std::invalid_argument("time_limit needs n_keep, not tol");
}

bool out_of_time(const SelectOptions& opt, std::chrono::steady_clock::time_point start) {
  if (opt.time_limit < 0) return false;
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() >= opt.time_limit;
}

Problem::Problem(const ProblemInput& in, const Groups& groups) : in_(in), groups_(groups), D_(in.D), m_(in.m) {
  if (D_ <= 0) throw std::invalid_argument("n_features must be positive");
  validate_groups(groups_, D_);  // before anything indexed by a group column is read
  if (m_ <= 0) throw std::invalid_argument("there are no targets: stream y or pass weights_in");
  if (!in.gram) throw std::invalid_argument("gram is required");
  if (!in.cross && !in.weights_in) throw std::invalid_argument("either cross statistics or weights_in are required");
  if (!(in.damping >= 0) || !std::isfinite(in.damping)) throw std::invalid_argument("damping must be >= 0");
  const double n = in.count;
  if (in.fit_intercept) {
    if (!(n > 0)) throw std::invalid_argument("the statistics hold no samples (count == 0)");
    if (!in.sum_x) throw std::invalid_argument("fit_intercept needs the sum (or mean) of x and the count");
  }
  mx_.assign(D_, 0.0);
  if (in.fit_intercept)
    for (Index j = 0; j < D_; ++j) mx_[j] = in.sum_x[j] / n;
  my_.assign(m_, 0.0);
  Bc_.assign(std::size_t(D_) * m_, 0.0);

  if (in.cross) {
    if (in.fit_intercept && !in.sum_y) throw std::invalid_argument("fit_intercept needs the sum (or mean) of y");
    std::copy(in.cross, in.cross + std::size_t(D_) * m_, Bc_.begin());
    double e = in.target_energy;
    if (in.fit_intercept) {
      for (Index k = 0; k < m_; ++k) my_[k] = in.sum_y[k] / n;
#pragma omp parallel for schedule(static)
      for (Index j = 0; j < D_; ++j)
        for (Index k = 0; k < m_; ++k) Bc_[std::size_t(j) * m_ + k] -= n * mx_[j] * my_[k];
      for (Index k = 0; k < m_; ++k) e -= n * my_[k] * my_[k];
    }
    energy_ = std::max(e, 0.0);
  } else {
    // Independent mode: y = W x + b, so Bc = Gc W^T and energy = tr(W Gc W^T).
    const double* W = in.weights_in;
    const bool factored = few_rows_cross(W);
    if (!factored) blas::gemm(false, true, D_, m_, D_, 1.0, in.gram, D_, W, D_, 0.0, Bc_.data(), m_);
    if (in.fit_intercept) {
      std::vector<double> wmx(m_, 0.0);  // W mx
      for (Index k = 0; k < m_; ++k) {
        double s = 0;
        for (Index j = 0; j < D_; ++j) s += W[std::size_t(k) * D_ + j] * mx_[j];
        wmx[k] = s;
      }
      if (!factored) {
#pragma omp parallel for schedule(static)
        for (Index j = 0; j < D_; ++j)
          for (Index k = 0; k < m_; ++k) Bc_[std::size_t(j) * m_ + k] -= n * mx_[j] * wmx[k];
      }
      for (Index k = 0; k < m_; ++k) my_[k] = wmx[k] + (in.bias_in ? in.bias_in[k] : 0.0);
    }
    double e = 0;
#pragma omp parallel for reduction(+ : e) schedule(static)
    for (Index j = 0; j < D_; ++j)
      for (Index k = 0; k < m_; ++k) e += Bc_[std::size_t(j) * m_ + k] * W[std::size_t(k) * D_ + j];
    energy_ = std::max(e, 0.0);
  }

  normalize_units();
  // Damping scale: mean centred variance over the candidate columns.
  double s = 0;
  for (Index c : groups_.columns) s += in_.gram[std::size_t(c) * D_ + c] - n * mx_[c] * mx_[c];
  mean_diag_ = groups_.columns.empty() ? 0.0 : std::max(s / double(groups_.columns.size()), 0.0);
  set_damping(in.damping);
}

// Independent mode with few rows: Bc = Gc W^T = Lt (Lt^T W^T) from a pivoted Cholesky of the centred Gram,
// O(D r^2 + 4 r D m) instead of the 2 D^2 m of the dense product (AlexNet's 9216 -> 4096 pair with 8 images:
// 0.6 GFLOP instead of 700). Only where the rank bound is small and the factor represents Gc to rounding
// (the rounding the low-rank forward state leaves out as well); false: nothing was written.
bool Problem::few_rows_cross(const double* W) {
  const Index rb = rows_rank_bound(in_.count, in_.fit_intercept);
  if (rb < 0 || 4 * rb > D_ || double(D_) * D_ * m_ < 1e8) return false;
  const double n = in_.count, c = in_.fit_intercept ? n : 0.0;
  std::vector<double> d(D_);
  for (Index j = 0; j < D_; ++j) d[j] = in_.gram[std::size_t(j) * D_ + j] - c * mx_[j] * mx_[j];
  auto row = [&](Index q, double* out) {
    const double* g = in_.gram + std::size_t(q) * D_;
    for (Index p = 0; p < D_; ++p) out[p] = g[p] - c * mx_[q] * mx_[p];
  };
  std::vector<double> Lt;
  std::vector<Index> piv;
  const Index r = pivoted_cholesky(D_, rb, row, std::move(d), Lt, piv);
  if (r < 0) return false;
  std::vector<double> T(std::size_t(r) * m_, 0.0);  // Lt^T W^T (r x m)
  if (r > 0) {
    blas::gemm(true, true, r, m_, D_, 1.0, Lt.data(), r, W, D_, 0.0, T.data(), m_);
    blas::gemm(false, false, D_, m_, r, 1.0, Lt.data(), r, T.data(), m_, 0.0, Bc_.data(), m_);
  }
  return true;
}

namespace {
// Exponent e with s 2^-2e in [1/2, 4) when s > 0 lies outside 2^[-kUnitBand, kUnitBand]; else 0.
int unit_exponent(double s) {
  if (!(s > 0) || !std::isfinite(s)) return 0;
  const int h = std::ilogb(s);
  return std::abs(h) <= range::kUnitBand ? 0 : h / 2;
}

void scale_by(std::vector<double>& v, int e) {
  if (e != 0)
    for (double& a : v) a = std::ldexp(a, e);
}
}  // namespace

// Moves the problem to working units (see the class comment). Refuses a Gram or target
// energy whose entries underflowed (InputOutOfRange): solving them would be wrong.
void Problem::normalize_units() {
  double gmax = 0;
  for (Index j = 0; j < D_; ++j) gmax = std::max(gmax, in_.gram[std::size_t(j) * D_ + j]);
  const double tiny = std::ldexp(1.0, range::kMinSumSqExp);
  const double raw_energy = in_.cross ? in_.target_energy : energy_;
  if ((gmax > 0 && gmax < tiny) || (raw_energy > 0 && raw_energy < tiny))
    throw InputOutOfRange("the statistics are too small for float64: the largest Gram diagonal or the target "
                          "energy lies below 2^" + std::to_string(range::kMinSumSqExp) +
                          " (their products underflowed); rescale the data (e.g. by a power of two)");
  ex_ = unit_exponent(gmax);
  ey_ = unit_exponent(energy_);
  if (ex_ != 0) {
    gram_units_.assign(in_.gram, in_.gram + std::size_t(D_) * D_);
    scale_by(gram_units_, -2 * ex_);
    in_.gram = gram_units_.data();
    scale_by(mx_, -ex_);
  }
  scale_by(Bc_, -(ex_ + ey_));
  scale_by(my_, -ey_);
  energy_ = std::ldexp(energy_, -2 * ey_);
}

void Problem::to_caller_units(std::vector<double>& v, int y_power, int x_power) const {
  scale_by(v, y_power * ey_ + x_power * ex_);
}

double Problem::errors_to_caller(double e) const { return std::ldexp(e, 2 * ey_); }
double Problem::to_caller_ridge(double lambda) const { return std::ldexp(lambda, 2 * ex_); }

void Problem::set_damping(double rel) {
  damping_ = rel;
  lambda_ = policy::ridge(rel, mean_diag_);
}

void Problem::gram_row(Index j, const Index* cols, Index n, double* out) const {
  const double* g = in_.gram + std::size_t(j) * D_;
  const double nmj = in_.count * mx_[j];
  if (in_.fit_intercept) {
    for (Index p = 0; p < n; ++p) out[p] = g[cols[p]] - nmj * mx_[cols[p]];
  } else {
    for (Index p = 0; p < n; ++p) out[p] = g[cols[p]];
  }
  if (lambda_ != 0)
    for (Index p = 0; p < n; ++p)
      if (cols[p] == j) out[p] += lambda_;
}

double Problem::gram_diag(Index j) const {
  return in_.gram[std::size_t(j) * D_ + j] - in_.count * mx_[j] * mx_[j] * (in_.fit_intercept ? 1 : 0) + lambda_;
}

void Problem::finish(const std::vector<Index>& cols, const std::vector<double>& Wt, double ridge_error,
                     SelectResult& res) const {
  const Index K = Index(cols.size()), m = m_;
  std::vector<Index> order(K);
  std::iota(order.begin(), order.end(), Index(0));
  std::sort(order.begin(), order.end(), [&](Index a, Index b) { return cols[a] < cols[b]; });
  res.columns.resize(K);
  res.weights.assign(std::size_t(m) * K, 0.0);
  double wnorm = 0;
  for (Index q = 0; q < K; ++q) {
    Index r = order[q];
    res.columns[q] = cols[r];
    for (Index k = 0; k < m; ++k) {
      double w = Wt[std::size_t(r) * m + k];
      res.weights[std::size_t(k) * K + q] = w;
      wnorm += w * w;
    }
  }
  res.bias.assign(m, 0.0);
  if (in_.fit_intercept) {
    for (Index k = 0; k < m; ++k) {
      double b = my_[k];
      for (Index q = 0; q < K; ++q) b -= res.weights[std::size_t(k) * K + q] * mx_[res.columns[q]];
      res.bias[k] = b;
    }
  }
  res.error = errors_to_caller(std::max(ridge_error, 0.0));
  res.plain_error = errors_to_caller(std::max(ridge_error - lambda_ * wnorm, 0.0));
  res.energy = errors_to_caller(energy_);
  res.damping = damping_;
  res.lambda = to_caller_ridge(lambda_);
  to_caller_units(res.weights, 1, -1);
  to_caller_units(res.bias, 1, 0);
  to_caller_units(res.error_path, 2, 0);
}

std::vector<double> Problem::intercept(const std::vector<double>& U, const std::vector<double>& V, Index r) const {
  std::vector<double> b(m_, 0.0);
  if (!in_.fit_intercept) return b;
  std::vector<double> vm(r, 0.0);  // V mx
  for (Index q = 0; q < r; ++q)
    for (Index j = 0; j < D_; ++j) vm[q] += V[std::size_t(q) * D_ + j] * mx_[j];
  for (Index k = 0; k < m_; ++k) {
    double s = my_[k];
    for (Index q = 0; q < r; ++q) s -= U[std::size_t(k) * r + q] * vm[q];
    b[k] = s;
  }
  return b;
}

SelectResult select(Problem& prob, const SelectOptions& opt) {
  validate(prob.groups(), prob.D(), opt);
  SelectResult res = opt.method == Method::Backward ? select_backward(prob, opt) : select_forward(prob, opt);
  return refine_swaps(prob, std::move(res), opt, opt.refine);
}

}  // namespace lsp
