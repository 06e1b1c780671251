// The flat surgery's two passes on the CPU, as plain loops the compiler vectorises.
//
// coefficients: c[i] = <rows[i], h> for every row (and |h|^2 when asked) in one pass over
//               the rows and h;
// accumulate:   h += rows^T w (or h = rows^T w) in one pass, h read and written once.
//
// On the 2-core machine the project is tested on, the flat step through torch.mv and addmv_
// (BLAS gemv) takes 1.4-1.5x its bytes floor, through these loops 1.1-1.3x
// (benchmarks/RESULTS.md). These loops read up to GROUP rows and h together,
// column by column, in blocks of BLOCK columns (h's block stays in cache while further
// groups of rows are read).
//
// Rows are a (r, n) view with unit column stride and any row stride (a chunk of a longer
// tensor's rows); the apply pass takes them transposed, (n, r), as the torch backend keeps
// them. Everything is float32; sums are float32 per lane within a block and float64 across
// blocks. Each call runs on the calling thread with the GIL released: the torch backend's
// own threads split a step's columns between them.
//
// Built on first use by gradsafe.backends.cpu_kernels (torch.utils.cpp_extension.load).

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t GROUP = 8;      // rows read together
constexpr int64_t BLOCK = 16384;  // columns per block: h's block (64 KiB) stays in L2
// float32 partial sums per row: with fewer rows, more lanes per row, so that enough
// independent sums are in flight to hide the latency of a fused multiply-add
template <int G>
constexpr int LANES = G >= 4 ? 8 : (G >= 2 ? 16 : 32);

// acc[g] += <row g, h> over [lo, hi) for G rows; norm (if not null) += |h|^2 over the same.
template <int G>
void dot_rows(const float* const* row, const float* h, int64_t lo, int64_t hi, double* acc, double* norm) {
  constexpr int L = LANES<G>;
  float part[G][L] = {};
  float sq[L] = {};
  int64_t j = lo;
  for (; j + L <= hi; j += L) {
    const float* x = h + j;
    for (int g = 0; g < G; ++g) {
      const float* r = row[g] + j;
#pragma omp simd
      for (int l = 0; l < L; ++l) part[g][l] += r[l] * x[l];
    }
    if (norm != nullptr) {
#pragma omp simd
      for (int l = 0; l < L; ++l) sq[l] += x[l] * x[l];
    }
  }
  for (int g = 0; g < G; ++g) {
    double s = 0.0;
    for (int l = 0; l < L; ++l) s += part[g][l];
    for (int64_t t = j; t < hi; ++t) s += static_cast<double>(row[g][t]) * h[t];
    acc[g] += s;
  }
  if (norm != nullptr) {
    double s = 0.0;
    for (int l = 0; l < L; ++l) s += sq[l];
    for (int64_t t = j; t < hi; ++t) s += static_cast<double>(h[t]) * h[t];
    *norm += s;
  }
}

// h[lo:hi] (+)= sum_g w[g] row[g][lo:hi] for G rows.
template <int G>
void axpy_rows(const float* const* row, const float* w, float* h, int64_t lo, int64_t hi, bool overwrite) {
  float wg[G];
  const float* rg[G];
  for (int g = 0; g < G; ++g) {
    wg[g] = w[g];
    rg[g] = row[g];
  }
  if (overwrite) {
#pragma omp simd
    for (int64_t j = lo; j < hi; ++j) {
      float s = 0.0f;
      for (int g = 0; g < G; ++g) s += wg[g] * rg[g][j];
      h[j] = s;
    }
  } else {
#pragma omp simd
    for (int64_t j = lo; j < hi; ++j) {
      float s = 0.0f;
      for (int g = 0; g < G; ++g) s += wg[g] * rg[g][j];
      h[j] += s;
    }
  }
}

template <typename F>
void by_group(int64_t g, F&& f) {
  switch (g) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

void check_vector(const torch::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32, what, " must be a float32 CPU tensor");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.stride(0) == 1, what, " must be contiguous with ", n, " entries");
}

// rows (r, n) with unit column stride; the pointers to each row's first column
std::vector<const float*> row_pointers(const torch::Tensor& rows) {
  TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == torch::kFloat32, "rows must be a float32 CPU tensor");
  TORCH_CHECK(rows.dim() == 2 && (rows.size(1) <= 1 || rows.stride(1) == 1), "rows must be (r, n) with unit column stride");
  const float* base = rows.data_ptr<float>();
  std::vector<const float*> out(rows.size(0));
  for (int64_t i = 0; i < rows.size(0); ++i) out[i] = base + i * rows.stride(0);
  return out;
}

}  // namespace

// out[i] = <rows[i], h>; norm (a one-entry tensor, or None) = |h|^2
void coefficients(const torch::Tensor& rows, const torch::Tensor& h, torch::Tensor out, c10::optional<torch::Tensor> norm) {
  const int64_t r = rows.size(0), n = rows.dim() == 2 ? rows.size(1) : -1;
  std::vector<const float*> row = row_pointers(rows);
  check_vector(h, n, "h");
  check_vector(out, r, "out");
  if (norm.has_value()) check_vector(*norm, 1, "norm");
  std::vector<double> acc(std::max<int64_t>(r, 1), 0.0);
  double sq = 0.0;
  const float* x = h.data_ptr<float>();
  for (int64_t lo = 0; lo < n; lo += BLOCK) {
    const int64_t hi = std::min(n, lo + BLOCK);
    if (r == 0) {  // the norm alone (h against itself, the dot discarded)
      if (norm.has_value()) dot_rows<1>(&x, x, lo, hi, acc.data(), &sq);
      continue;
    }
    for (int64_t g0 = 0; g0 < r; g0 += GROUP) {
      double* norm_acc = (g0 == 0 && norm.has_value()) ? &sq : nullptr;
      by_group(std::min(GROUP, r - g0), [&](auto G) {
        dot_rows<decltype(G)::value>(row.data() + g0, x, lo, hi, acc.data() + g0, norm_acc);
      });
    }
  }
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < r; ++i) o[i] = static_cast<float>(acc[i]);
  if (norm.has_value()) norm->data_ptr<float>()[0] = static_cast<float>(sq);
}

// h += rows_t w (overwrite: h = rows_t w); rows_t is (n, r): the rows transposed
void accumulate(const torch::Tensor& rows_t, const torch::Tensor& w, torch::Tensor h, bool overwrite) {
  TORCH_CHECK(rows_t.dim() == 2, "rows_t must be (n, r)");
  const torch::Tensor rows = rows_t.t();
  const int64_t r = rows.size(0), n = rows.size(1);
  std::vector<const float*> row = row_pointers(rows);
  check_vector(w, r, "w");
  check_vector(h, n, "h");
  float* y = h.data_ptr<float>();
  if (r == 0) {
    if (overwrite) std::fill(y, y + n, 0.0f);
    return;
  }
  const float* wv = w.data_ptr<float>();
  for (int64_t lo = 0; lo < n; lo += BLOCK) {
    const int64_t hi = std::min(n, lo + BLOCK);
    for (int64_t g0 = 0; g0 < r; g0 += GROUP) {
      const int64_t g = std::min(GROUP, r - g0);
      by_group(g, [&](auto G) {
        axpy_rows<decltype(G)::value>(row.data() + g0, wv + g0, y, lo, hi, overwrite && g0 == 0);
      });
    }
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("coefficients", &coefficients, "c = rows h (and |h|^2)", py::arg("rows"), py::arg("h"), py::arg("out"),
        py::arg("norm") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("accumulate", &accumulate, "h += rows_t w (or h = rows_t w)", py::arg("rows_t"), py::arg("w"), py::arg("h"),
        py::arg("overwrite") = false, py::call_guard<py::gil_scoped_release>());
}
