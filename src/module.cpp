// lsprune._core: the thin pybind11 layer. Array conversion, GIL release and
// exception translation only; every algorithm lives in cpp/.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "lsprune/accumulate.hpp"
#include "lsprune/blas.hpp"
#include "lsprune/factorize.hpp"
#include "lsprune/forward_state.hpp"
#include "lsprune/joint.hpp"
#include "lsprune/policy.hpp"
#include "lsprune/problem.hpp"
#include "lsprune/threads.hpp"
#include "lsprune_cuda.hpp"

namespace py = pybind11;
using lsp::Index;

namespace {

using F64 = py::array_t<double, py::array::c_style>;

lsp::MatrixView view_of(const py::array& a, const char* name) {
  if (a.ndim() != 2) throw std::invalid_argument(std::string(name) + " must be 2-D");
  lsp::MatrixView v;
  const char kind = a.dtype().kind();
  const Index item = a.itemsize();
  if (kind != 'f') throw py::type_error(std::string(name) + " must be a float16/float32/float64 array");
  if (item == 2) v.dtype = lsp::DType::F16;
  else if (item == 4) v.dtype = lsp::DType::F32;
  else if (item == 8) v.dtype = lsp::DType::F64;
  else throw py::type_error(std::string(name) + " must be float16, float32 or float64");
  const Index s0 = a.strides(0), s1 = a.strides(1);
  if (s0 < 0 || s1 < 0 || s0 % item || s1 % item)
    throw std::invalid_argument(std::string(name) + " has negative or unaligned strides");
  v.data = a.data();
  v.rows = a.shape(0);
  v.cols = a.shape(1);
  v.row_stride = s0 / item;
  v.col_stride = s1 / item;
  return v;
}

double* mut(F64& a, Index n, const char* name) {
  if (a.size() != n) throw std::invalid_argument(std::string("internal: ") + name + " has the wrong size");
  return a.mutable_data();
}

const double* ptr_or_null(const std::optional<F64>& a, Index n, const char* name) {
  if (!a) return nullptr;
  if (a->size() != n)
    throw std::invalid_argument(std::string(name) + " has " + std::to_string(a->size()) + " elements; expected " +
                                std::to_string(n));
  return a->data();
}

template <class T>
py::array_t<T> to_array(const std::vector<T>& v) {
  py::array_t<T> out(v.size());
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

// The selection fields a single and a joint result share.
template <class Result>
py::dict path_dict(const Result& r) {
  py::dict d;
  d["selected"] = to_array(r.selected);
  d["removed"] = to_array(r.removed);
  d["error_path"] = to_array(r.error_path);
  d["kept_path"] = to_array(r.kept_path);
  d["skipped"] = to_array(r.skipped);
  d["stopped_early"] = r.stopped_early;
  return d;
}

py::dict to_dict(const lsp::SelectResult& r, Index m) {
  py::dict d = path_dict(r);
  d["timed_out"] = r.timed_out;
  d["filled"] = to_array(r.filled);
  d["columns"] = to_array(r.columns);
  py::array_t<double> w({m, Index(r.columns.size())});
  std::copy(r.weights.begin(), r.weights.end(), w.mutable_data());
  d["weights"] = w;
  d["bias"] = to_array(r.bias);
  d["error"] = r.error;
  d["plain_error"] = r.plain_error;
  d["energy"] = r.energy;
  d["damping"] = r.damping;
  d["lambda"] = r.lambda;
  d["swapped_out"] = to_array(r.swapped_out);
  d["swapped_in"] = to_array(r.swapped_in);
  return d;
}

// The statistics arguments shared by select, refit and factorize.
struct ProblemArgs {
  F64 gram;
  std::optional<F64> cross, weights_in, bias_in, sum_x, sum_y;
  double target_energy, count;
  bool fit_intercept;
  double damping;
};

lsp::ProblemInput make_input(const ProblemArgs& a, Index m) {
  lsp::ProblemInput in;
  const Index D = a.gram.ndim() == 2 ? a.gram.shape(0) : 0;
  in.D = D;
  in.m = m;
  if (a.gram.ndim() != 2 || a.gram.shape(0) != D || a.gram.shape(1) != D)
    throw std::invalid_argument("gram must have shape (D, D)");
  in.gram = a.gram.data();
  in.cross = ptr_or_null(a.cross, D * m, "cross");
  in.weights_in = ptr_or_null(a.weights_in, m * D, "weights_in");
  in.bias_in = ptr_or_null(a.bias_in, m, "bias_in");
  in.sum_x = ptr_or_null(a.sum_x, D, "sum_x");
  in.sum_y = ptr_or_null(a.sum_y, m, "sum_y");
  in.target_energy = a.target_energy;
  in.count = a.count;
  in.fit_intercept = a.fit_intercept;
  in.damping = a.damping;
  return in;
}

lsp::Groups make_groups(std::vector<Index> offsets, std::vector<Index> columns) {
  lsp::Groups g;
  g.offsets = std::move(offsets);
  g.columns = std::move(columns);
  return g;  // validated by lsp::Problem
}

lsp::Update parse_update(const std::string& update) {
  if (update == "auto") return lsp::Update::Auto;
  if (update == "residual") return lsp::Update::Residual;
  if (update == "blocked") return lsp::Update::Blocked;
  if (update == "lowrank") return lsp::Update::LowRank;
  throw std::invalid_argument("unknown update '" + update + "'");
}

lsp::SelectOptions make_options(const std::string& method, Index n_keep, double tol, std::vector<Index> force,
                                double rcond, Index refine = 0, double time_limit = -1,
                                const std::string& update = "auto") {
  lsp::SelectOptions opt;
  if (method == "forward") opt.method = lsp::Method::Forward;
  else if (method == "omp") opt.method = lsp::Method::Omp;
  else if (method == "backward") opt.method = lsp::Method::Backward;
  else throw std::invalid_argument("unknown method '" + method + "'");
  opt.n_keep = n_keep;
  opt.tol = tol;
  opt.force = std::move(force);
  opt.rcond = rcond;
  opt.refine = refine;
  opt.time_limit = time_limit;
  opt.update = parse_update(update);
  return opt;
}

// Builds the problem and runs `solve(problem)` on it without the GIL.
template <class Solve>
auto solve_without_gil(const ProblemArgs& a, Index m, const lsp::Groups& groups, Solve&& solve) {
  lsp::ProblemInput in = make_input(a, m);
  py::gil_scoped_release nogil;
  lsp::Problem prob(in, groups);
  return solve(prob);
}

// One problem of select_joint: a dict of problem_args' keys plus offsets, columns, n_targets.
ProblemArgs problem_args_of(const py::dict& d) {
  auto optional = [&](const char* key) -> std::optional<F64> {
    py::object o = d[key];
    if (o.is_none()) return std::nullopt;
    return o.cast<F64>();
  };
  return ProblemArgs{d["gram"].cast<F64>(),       optional("cross"),  optional("weights_in"),
                     optional("bias_in"),         optional("sum_x"),  optional("sum_y"),
                     d["target_energy"].cast<double>(), d["count"].cast<double>(),
                     d["fit_intercept"].cast<bool>(),   d["damping"].cast<double>()};
}

py::dict joint_to_dict(const lsp::JointResult& r, const std::vector<Index>& m) {
  py::dict d = path_dict(r);
  d["weights"] = to_array(r.weights);
  d["energy"] = r.energy;
  d["timed_out"] = r.timed_out;
  d["filled"] = to_array(r.filled);
  py::list problems;
  for (std::size_t i = 0; i < r.problems.size(); ++i) problems.append(to_dict(r.problems[i], m[i]));
  d["problems"] = problems;
  return d;
}

}  // namespace

// The statistics arguments of select, refit and factorize, in ProblemArgs order.
#define LSP_PROBLEM_PARAMS                                                                          \
  F64 gram, std::optional<F64> cross, std::optional<F64> weights_in, std::optional<F64> bias_in,  \
      std::optional<F64> sum_x, std::optional<F64> sum_y, double target_energy, double count,     \
      bool fit_intercept, double damping
#define LSP_PROBLEM_ARGS \
  ProblemArgs { gram, cross, weights_in, bias_in, sum_x, sum_y, target_energy, count, fit_intercept, damping }
#define LSP_PROBLEM_PYARGS                                                                          \
  py::arg("gram"), py::arg("cross"), py::arg("weights_in"), py::arg("bias_in"), py::arg("sum_x"),  \
      py::arg("sum_y"), py::arg("target_energy"), py::arg("count"), py::arg("fit_intercept"),      \
      py::arg("damping")

// The bindings, one function per group of the engine (called from PYBIND11_MODULE below).
static void bind_statistics(py::module_& mod) {
  py::class_<lsp::Accumulator>(mod, "Accumulator")
      .def(py::init<Index, Index>(), py::arg("n_features"), py::arg("n_targets"))
      .def_property_readonly("n_features", &lsp::Accumulator::D)
      .def_property_readonly("n_targets", &lsp::Accumulator::m)
      .def("set_chunk_rows", &lsp::Accumulator::set_chunk_rows)
      .def("set_flush_rows", &lsp::Accumulator::set_flush_rows)
      .def_property_readonly("pending_rows", &lsp::Accumulator::pending_rows)
      .def("discard", &lsp::Accumulator::discard)
      .def(
          "flush",
          [](lsp::Accumulator& acc, F64 gram, F64 cross) {
            const Index D = acc.D(), m = acc.m();
            lsp::Sums s;
            s.D = D;
            s.m = m;
            s.gram = mut(gram, D * D, "gram");
            s.cross = m ? mut(cross, D * m, "cross") : nullptr;
            py::gil_scoped_release nogil;
            acc.flush(s);
          },
          py::arg("gram").noconvert(), py::arg("cross").noconvert())
      .def(
          "update",
          [](lsp::Accumulator& acc, const py::array& x, const std::optional<py::array>& y, F64 gram, F64 cross,
             F64 sum_x, F64 sum_y, F64 sum_yy) {
            const Index D = acc.D(), m = acc.m();
            lsp::MatrixView xv = view_of(x, "x"), yv;
            if (y) yv = view_of(*y, "y");
            lsp::Sums s;
            s.D = D;
            s.m = m;
            s.gram = mut(gram, D * D, "gram");
            s.cross = m ? mut(cross, D * m, "cross") : nullptr;
            s.sum_x = mut(sum_x, D, "sum_x");
            s.sum_y = m ? mut(sum_y, m, "sum_y") : nullptr;
            s.sum_yy = m ? mut(sum_yy, m, "sum_yy") : nullptr;
            py::gil_scoped_release nogil;
            acc.update(xv, y ? &yv : nullptr, s);
          },
          // The sums are updated in place: never accept a converted copy.
          py::arg("x"), py::arg("y"), py::arg("gram").noconvert(), py::arg("cross").noconvert(),
          py::arg("sum_x").noconvert(), py::arg("sum_y").noconvert(), py::arg("sum_yy").noconvert());
}

static void bind_solvers(py::module_& mod) {
  mod.def(
      "select",
      [](LSP_PROBLEM_PARAMS, std::vector<Index> offsets, std::vector<Index> columns, const std::string& method,
         Index n_keep, double tol, std::vector<Index> force, double rcond, Index m, Index refine,
         double time_limit, const std::string& update) {
        const lsp::SelectOptions opt =
            make_options(method, n_keep, tol, std::move(force), rcond, refine, time_limit, update);
        const lsp::Groups groups = make_groups(std::move(offsets), std::move(columns));
        return to_dict(solve_without_gil(LSP_PROBLEM_ARGS, m, groups,
                                         [&](lsp::Problem& prob) { return lsp::select(prob, opt); }),
                       m);
      },
      LSP_PROBLEM_PYARGS, py::arg("offsets"), py::arg("columns"), py::arg("method"), py::arg("n_keep"),
      py::arg("tol"), py::arg("force"), py::arg("rcond"), py::arg("n_targets"), py::arg("refine") = 0,
      py::arg("time_limit") = -1.0, py::arg("update") = "auto");
#ifdef LSPRUNE_HAVE_CUDA
  mod.def(
      "select_cuda",
      [](LSP_PROBLEM_PARAMS, std::vector<Index> offsets, std::vector<Index> columns, const std::string& method,
         Index n_keep, double tol, std::vector<Index> force, double rcond, Index m, int device, Index refine,
         double time_limit) {
        const lsp::SelectOptions opt =
            make_options(method, n_keep, tol, std::move(force), rcond, refine, time_limit);
        const lsp::Groups groups = make_groups(std::move(offsets), std::move(columns));
        // the refinement runs on the host after the device's selection
        return to_dict(solve_without_gil(LSP_PROBLEM_ARGS, m, groups,
                                         [&](lsp::Problem& prob) {
                                           return lsp::refine_swaps(prob, lsp::cuda::select(prob, opt, device), opt,
                                                                    opt.refine);
                                         }),
                       m);
      },
      LSP_PROBLEM_PYARGS, py::arg("offsets"), py::arg("columns"), py::arg("method"), py::arg("n_keep"),
      py::arg("tol"), py::arg("force"), py::arg("rcond"), py::arg("n_targets"), py::arg("device"),
      py::arg("refine") = 0, py::arg("time_limit") = -1.0);
#endif
  mod.def(
      "refit",
      [](LSP_PROBLEM_PARAMS, std::vector<Index> offsets, std::vector<Index> columns, std::vector<Index> keep,
         Index m) {
        const lsp::Groups groups = make_groups(std::move(offsets), std::move(columns));
        return to_dict(solve_without_gil(LSP_PROBLEM_ARGS, m, groups,
                                         [&](lsp::Problem& prob) { return lsp::refit(prob, keep); }),
                       m);
      },
      LSP_PROBLEM_PYARGS, py::arg("offsets"), py::arg("columns"), py::arg("keep"), py::arg("n_targets"));

  mod.def(
      "factorize",
      [](LSP_PROBLEM_PARAMS, Index rank, double tol, Index m) {
        const Index D = gram.ndim() == 2 ? gram.shape(0) : 0;
        const lsp::FactorizeResult r =
            solve_without_gil(LSP_PROBLEM_ARGS, m, lsp::Groups::consecutive(D, 1),
                              [&](lsp::Problem& prob) { return lsp::factorize(prob, rank, tol); });
        py::dict d;
        py::array_t<double> U({m, r.rank}), V({r.rank, D});
        std::copy(r.U.begin(), r.U.end(), U.mutable_data());
        std::copy(r.V.begin(), r.V.end(), V.mutable_data());
        d["U"] = U;
        d["V"] = V;
        d["bias"] = to_array(r.bias);
        d["error_path"] = to_array(r.error_path);
        d["energy"] = r.energy;
        d["damping"] = r.damping;
        d["lambda"] = r.lambda;
        return d;
      },
      LSP_PROBLEM_PYARGS, py::arg("rank"), py::arg("tol"), py::arg("n_targets"));
  mod.def(
      "mirror_upper",
      [](F64 a) {
        if (a.ndim() != 2 || a.shape(0) != a.shape(1)) throw std::invalid_argument("expected a square matrix");
        double* p = a.mutable_data();
        const Index n = a.shape(0);
        py::gil_scoped_release nogil;
        lsp::mirror_upper(p, n);
      },
      py::arg("a").noconvert());
  mod.def(
      "symmetry_check",
      [](F64 a) {
        if (a.ndim() != 2 || a.shape(0) != a.shape(1)) throw std::invalid_argument("expected a square matrix");
        double asym = 0, mx = 0;
        const double* p = a.data();
        const Index n = a.shape(0);
        {
          py::gil_scoped_release nogil;
          lsp::symmetry_check(p, n, &asym, &mx);
        }
        return py::make_tuple(asym, mx);
      },
      py::arg("a"));
}

static void bind_joint(py::module_& mod) {
  mod.def(
      "select_joint",
      [](const std::vector<py::dict>& problems, std::optional<std::vector<double>> weights, const std::string& method,
         Index n_keep, double tol, std::vector<Index> force, double rcond, const std::string& update,
         double time_limit) {
        const lsp::SelectOptions opt =
            make_options(method, n_keep, tol, std::move(force), rcond, 0, time_limit, update);
        std::vector<ProblemArgs> args;  // own the arrays the inputs point into
        args.reserve(problems.size());
        std::vector<lsp::ProblemInput> inputs;
        std::vector<lsp::Groups> groups;
        std::vector<Index> m;
        for (const py::dict& d : problems) {
          args.push_back(problem_args_of(d));
          m.push_back(d["n_targets"].cast<Index>());
          inputs.push_back(make_input(args.back(), m.back()));
          groups.push_back(make_groups(d["offsets"].cast<std::vector<Index>>(), d["columns"].cast<std::vector<Index>>()));
        }
        lsp::JointResult r;
        {
          py::gil_scoped_release nogil;
          r = lsp::select_joint(inputs, groups, weights.value_or(std::vector<double>{}), opt);
        }
        return joint_to_dict(r, m);
      },
      py::arg("problems"), py::arg("weights"), py::arg("method"), py::arg("n_keep"), py::arg("tol"),
      py::arg("force"), py::arg("rcond"), py::arg("update") = "auto", py::arg("time_limit") = -1.0);
  mod.def(
      "blocked_forward_pays",
      [](Index n_columns, Index n_targets, Index n_keep_columns, Index group_size) {
        return lsp::blocked_forward_pays(n_columns, n_targets, n_keep_columns, group_size);
      },
      py::arg("n_columns"), py::arg("n_targets"), py::arg("n_keep_columns"), py::arg("group_size") = 1);
  mod.def(
      "lowrank_forward_pays",
      [](Index n_columns, Index n_targets, Index n_keep_columns, Index group_size, Index rank) {
        return lsp::lowrank_forward_pays(n_columns, n_targets, n_keep_columns, group_size, rank);
      },
      py::arg("n_columns"), py::arg("n_targets"), py::arg("n_keep_columns"), py::arg("group_size"),
      py::arg("rank"));
}

static void bind_cuda(py::module_& mod) {
#ifdef LSPRUNE_HAVE_CUDA
  mod.def("cuda_device_count", []() { return lsp::cuda::device_count(); });
  mod.def("cuda_device_name", [](int d) { return lsp::cuda::device_name(d); });
  py::class_<lsp::cuda::DeviceStatistics>(mod, "DeviceStatistics")
      .def(py::init<Index, Index, int, bool>(), py::arg("n_features"), py::arg("n_targets"), py::arg("device"),
           py::arg("float64_sums"))
      .def_property_readonly("n_features", &lsp::cuda::DeviceStatistics::D)
      .def_property_readonly("n_targets", &lsp::cuda::DeviceStatistics::m)
      .def_property_readonly("device", &lsp::cuda::DeviceStatistics::device)
      .def(
          "update",
          [](lsp::cuda::DeviceStatistics& st, py::tuple x, std::optional<py::tuple> y, std::uintptr_t stream) {
            // (data pointer, dtype code, rows, cols, row stride, col stride), strides in elements
            auto conv = [](const py::tuple& t) {
              if (t.size() != 6) throw std::invalid_argument("internal: device matrix descriptor");
              lsp::cuda::DeviceMatrix d;
              d.data = t[0].cast<std::uintptr_t>();
              d.dtype = t[1].cast<int>();
              d.rows = t[2].cast<Index>();
              d.cols = t[3].cast<Index>();
              d.row_stride = t[4].cast<Index>();
              d.col_stride = t[5].cast<Index>();
              return d;
            };
            lsp::cuda::DeviceMatrix xd = conv(x), yd;
            if (y) yd = conv(*y);
            py::gil_scoped_release nogil;
            st.update(xd, y ? &yd : nullptr, stream);
          },
          py::arg("x"), py::arg("y"), py::arg("stream"))
      .def("read",
           [](lsp::cuda::DeviceStatistics& st) {
             const Index D = st.D(), m = st.m();
             py::array_t<double> G({D, D}), B({D, m}), sx(D), sy(m), syy(m);
             Index rej = 0, rej_rows = 0;
             {
               double *g = G.mutable_data(), *b = B.mutable_data(), *x = sx.mutable_data(), *y = sy.mutable_data(),
                      *yy = syy.mutable_data();
               py::gil_scoped_release nogil;
               rej = st.read(g, b, x, y, yy, &rej_rows);
             }
             return py::make_tuple(G, B, sx, sy, syy, rej, rej_rows);
           })
      .def("reset", &lsp::cuda::DeviceStatistics::reset);
#else
  mod.def("cuda_device_count", []() { return 0; });
#endif
}

static void bind_info(py::module_& mod) {
  mod.def("set_num_threads", &lsp::set_num_threads, py::arg("n"));
  mod.def("get_num_threads", &lsp::num_threads);
  mod.def("blas_num_threads", []() { return lsp::blas::num_threads(); });
  mod.def("damping_policy", []() {
    py::dict d;
    d["escalation_start"] = lsp::policy::kEscalationStart;
    d["escalation_factor"] = lsp::policy::kEscalationFactor;
    d["max_damping"] = lsp::policy::kMaxDamping;
    return d;
  });
  mod.def("build_info", []() {
    py::dict d;
    d["openmp"] = _OPENMP;
    d["blas"] = "scipy-openblas32";
#ifdef LSPRUNE_HAVE_CUDA
    d["cuda"] = true;
#else
    d["cuda"] = false;
#endif
    return d;
  });
}

PYBIND11_MODULE(_core, mod) {
  mod.doc() = "lsprune compiled engine (internal; use the lsprune package)";
#ifdef LSPRUNE_VERSION
  mod.attr("__version__") = LSPRUNE_VERSION;
#endif
  // Typed errors: the Python side decides on the class, never on the message.
  py::register_exception<lsp::NumericalError>(mod, "NumericalError", PyExc_ArithmeticError);
  py::register_exception<lsp::NonFiniteInput>(mod, "NonFiniteInputError", PyExc_ValueError);
  py::register_exception<lsp::InputOutOfRange>(mod, "InputRangeError", PyExc_ValueError);

  bind_statistics(mod);
  bind_solvers(mod);
  bind_joint(mod);
  bind_cuda(mod);
  bind_info(mod);
}
