// Fused CPU kernels for EPTQ's training step (eptq_onnx/training_kernels.py builds and loads them).
//
// A training step of a small model is dominated by per-op overhead: in Python each activation
// fake quantizer is 4 elementwise ops and a Python autograd node, each loss tensor 3-4 ops and 2
// autograd nodes. Here each is one C++ call with its autograd node in C++. Small tensors take one
// vectorized pass forward and one backward (see SMALL); larger ones take ATen's own
// (multi-threaded) ops, where the per-op overhead no longer matters. Either way the results
// equal the Python reference (training_kernels.ClippedRound, the sum of weighted F.mse_loss
// terms): the same float32 operations in the same order, but for the loss's summation order
// (float rounding) and the sign of a rounded zero (+0 where torch may give -0). The soft weights
// and the rounding regularizer (SoftRoundingFn) equal the Python chain up to float rounding
// (torch's addcmul contracts floor + h * room into one rounding, and sums differ in order).
//
// No OpenMP here: the small tensors run on the calling thread, the large ones in ATen's pool.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <optional>
#include <vector>

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

// elements up to which one pass on this thread beats ATen's multi-threaded ops (measured on 2 cores;
// forward the one pass replaces four, backward one)
constexpr int64_t SMALL = 65536;
constexpr int64_t SMALL_FORWARD = 262144;
// (v + MAGIC) - MAGIC rounds v half to even for |v| < 2^22 (the sum's unit in the last place is
// 1), in the default rounding mode, and vectorizes where nearbyint does not (no SSE4.1 needed)
constexpr float MAGIC = 12582912.0f;  // 1.5 * 2^23

// The loops below take __restrict pointers so that the compiler vectorizes them (the build
// enables AVX2 where the CPU has it, and forbids contracting a * b + c into one rounding).

// x / step as onnxruntime's QuantizeLinear divides (x * (1 / step) rounds differently next to ties)
void clipped_round_loop(const float* __restrict x, float* __restrict y, int64_t n, float lo, float hi, float step) {
  for (int64_t i = 0; i < n; ++i) {
    float v = x[i];
    v = v < lo ? lo : v;  // a NaN stays NaN, as with at::clamp
    v = v > hi ? hi : v;
    v = v / step;
    v = (v + MAGIC) - MAGIC;
    y[i] = v * step;
  }
}

void pass_inside_loop(const float* __restrict x, const float* __restrict g, float* __restrict out, int64_t n,
                      float lo, float hi) {
  for (int64_t i = 0; i < n; ++i) out[i] = ((x[i] > lo) & (x[i] < hi)) ? g[i] : 0.0f;
}

// Adds a row's squared differences (a - b)^2 to LANES partial sums, as long as whole groups of
// LANES go, and returns the sum of the rest in double. The compiler keeps the partial sums in 4
// vector registers: with one, each add would wait for the one before (4x slower).
constexpr int LANES = 32;

double add_row_squared_error(const float* __restrict a, const float* __restrict b, int64_t cols, float* __restrict lanes) {
  float lane[LANES];
  std::copy(lanes, lanes + LANES, lane);
  int64_t c = 0;
  for (; c + LANES <= cols; c += LANES) {
    for (int j = 0; j < LANES; ++j) {
      const float e = a[c + j] - b[c + j];
      lane[j] += e * e;
    }
  }
  std::copy(lane, lane + LANES, lanes);
  double rest = 0.0;
  for (; c < cols; ++c) {
    const float e = a[c] - b[c];
    rest += static_cast<double>(e) * e;
  }
  return rest;
}

void scaled_difference_loop(const float* __restrict a, const float* __restrict b, float* __restrict out, int64_t cols,
                            float factor) {
  for (int64_t c = 0; c < cols; ++c) out[c] = (a[c] - b[c]) * factor;
}

// A 0-d CPU tensor holding value (cheaper than torch::tensor or at::scalar_tensor: no dispatch)
Tensor scalar(double value, at::ScalarType dtype) {
  Tensor out = at::empty({}, at::TensorOptions().dtype(dtype));
  if (dtype == at::kDouble) {
    *out.data_ptr<double>() = value;
  } else {
    *out.data_ptr<float>() = static_cast<float>(value);
  }
  return out;
}

bool small(const Tensor& t, int64_t limit = SMALL) { return t.numel() <= limit && t.is_contiguous(); }

// clamp(x, low, high) / scale, rounded half to even, * scale: one pass over a small tensor,
// ATen's ops over a large one
Tensor clipped_round_values(const Tensor& x, double scale, double low, double high) {
  if (!small(x, SMALL_FORWARD)) {
    return at::clamp(x, low, high).div_(scale).round_().mul_(scale);
  }
  Tensor y = at::empty_like(x);
  clipped_round_loop(x.data_ptr<float>(), y.data_ptr<float>(), x.numel(), static_cast<float>(low), static_cast<float>(high),
                     static_cast<float>(scale));
  return y;
}

// clipped_round_values forward; gradient: the incoming one where low < x < high, else 0 (torch's
// clamp followed by hardtanh_backward)
struct ClippedRoundFn : public torch::autograd::Function<ClippedRoundFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, double scale, double low, double high) {
    ctx->save_for_backward({x});
    ctx->saved_data["low"] = low;
    ctx->saved_data["high"] = high;
    return clipped_round_values(x, scale, low, high);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor x = ctx->get_saved_variables()[0];
    const Tensor& g = grads[0];
    const double low = ctx->saved_data["low"].toDouble(), high = ctx->saved_data["high"].toDouble();
    if (!small(x) || !g.is_contiguous()) {
      return {at::hardtanh_backward(g, x, low, high), Tensor(), Tensor(), Tensor()};
    }
    Tensor out = at::empty_like(g);
    pass_inside_loop(x.data_ptr<float>(), g.data_ptr<float>(), out.data_ptr<float>(), x.numel(),
                     static_cast<float>(low), static_cast<float>(high));
    return {out, Tensor(), Tensor(), Tensor()};
  }
};

// A student as [rows, cols] (rows: its first dimension) and its target in the same form: a target
// may be a column slice of a wider matrix (the teacher cache) or the teacher's own tensor. With
// an index, student row r is compared with target row index[r] (the target: every cached sample).
std::pair<Tensor, Tensor> as_rows(const Tensor& student, const Tensor& target, const Tensor& index, size_t k) {
  Tensor s = student.contiguous();
  const int64_t rows = s.dim() > 0 ? s.size(0) : 1, cols = rows > 0 ? s.numel() / rows : 0;
  s = s.view({rows, cols});
  Tensor t = target.dim() == 2 ? target : target.reshape({index.defined() ? -1 : rows, cols});
  TORCH_CHECK(t.size(1) == cols && (index.defined() ? index.numel() == rows : t.size(0) == rows),
              "weighted_mse: tensor ", k, ": the target's shape differs");
  if (cols > 1 && t.stride(1) != 1) t = t.contiguous();
  return {s, t};
}

// The target's row for student row r.
inline int64_t target_row(const int64_t* index, int64_t r) { return index != nullptr ? index[r] : r; }

// The optional row index as a contiguous int64 tensor (undefined without one), and its data.
Tensor row_index(const std::optional<Tensor>& index) {
  return index.has_value() ? index->to(at::kLong).contiguous() : Tensor();
}
const int64_t* index_data(const Tensor& index) { return index.defined() ? index.data_ptr<int64_t>() : nullptr; }

// The target's rows of this batch as one tensor (a gathered copy with an index): for ATen's ops.
Tensor batch_rows(const Tensor& t, const Tensor& index) { return index.defined() ? t.index_select(0, index) : t; }

// sum((s - t)^2) over a student [rows, cols] and its target rows, in double.
double squared_error_sum(const Tensor& s, const Tensor& t, const Tensor& index) {
  if (!small(s)) return at::mse_loss(s, batch_rows(t, index), at::Reduction::Sum).item<double>();
  const int64_t* ip = index_data(index);
  const float* sp = s.data_ptr<float>();
  const float* tp = t.data_ptr<float>();
  float lanes[LANES] = {};
  double sum = 0.0;
  for (int64_t r = 0; r < s.size(0); ++r) {
    sum += add_row_squared_error(sp + r * s.size(1), tp + target_row(ip, r) * t.stride(0), s.size(1), lanes);
  }
  for (int j = 0; j < LANES; ++j) sum += lanes[j];
  return sum;
}

// (s - t) * factor over a student [rows, cols] and its target rows: a loss term's gradient.
Tensor scaled_difference(const Tensor& s, const Tensor& t, const Tensor& index, double factor) {
  if (!small(s)) return at::sub(s, batch_rows(t, index)).mul_(factor);
  const int64_t* ip = index_data(index);
  Tensor grad = at::empty_like(s);
  const float* sp = s.data_ptr<float>();
  const float* tp = t.data_ptr<float>();
  float* gp = grad.data_ptr<float>();
  for (int64_t r = 0; r < s.size(0); ++r) {
    scaled_difference_loop(sp + r * s.size(1), tp + target_row(ip, r) * t.stride(0), gp + r * s.size(1), s.size(1),
                           static_cast<float>(factor));
  }
  return grad;
}

// sum_k weights[k] * mean((students[k] - targets[k][index])^2) (all target rows in order without
// an index); the backward pass returns each student's gradient in its own shape
struct WeightedMseFn : public torch::autograd::Function<WeightedMseFn> {
  static Tensor forward(AutogradContext* ctx, at::TensorList students, at::TensorList targets, std::vector<double> weights,
                        const std::optional<Tensor>& index_in) {
    TORCH_CHECK(students.size() == targets.size() && students.size() == weights.size(), "weighted_mse: lists of different lengths");
    const Tensor index = row_index(index_in);
    double total = 0.0;
    variable_list saved;
    for (size_t k = 0; k < students.size(); ++k) {
      auto [s, t] = as_rows(students[k], targets[k], index, k);
      total += weights[k] * squared_error_sum(s, t, index) / static_cast<double>(std::max<int64_t>(1, s.numel()));
      // the values only (no view of an autograd input to replay when unpacked): the student in
      // its own shape, which its gradient takes, and the target as [rows, cols]
      saved.push_back(s.view(students[k].sizes()).detach());
      saved.push_back(t.detach());
    }
    saved.push_back(index.defined() ? index : at::empty({0}, at::kLong));
    ctx->saved_data["weights"] = weights;
    ctx->saved_data["indexed"] = index.defined();
    ctx->save_for_backward(saved);
    return scalar(total, at::kDouble);  // the caller rounds the sum of all terms to float32
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const double g = grads[0].item<double>();
    const std::vector<double> weights = ctx->saved_data["weights"].toDoubleVector();
    const variable_list saved = ctx->get_saved_variables();
    const Tensor index = ctx->saved_data["indexed"].toBool() ? saved.back() : Tensor();
    variable_list out;
    for (size_t k = 0; k < weights.size(); ++k) {
      const Tensor& t = saved[2 * k + 1];
      const Tensor s = saved[2 * k].view({index.defined() ? index.numel() : t.size(0), t.size(1)});
      const double factor = 2.0 * weights[k] / static_cast<double>(std::max<int64_t>(1, s.numel())) * g;
      out.push_back(scaled_difference(s, t, index, factor).view(saved[2 * k].sizes()));
    }
    for (size_t k = 0; k < weights.size(); ++k) out.push_back(Tensor());  // targets
    out.push_back(Tensor());  // weights
    out.push_back(Tensor());  // index
    return out;
  }
};

// The fused quantizer-and-loss gradient of a [rows, cols] tensor: where low < x < high the
// incoming gradient g (none: 0), plus (x - t) * factor (has_loss), summed like the engine sums them.
void quant_tap_backward_rows(const Tensor& s, const Tensor& t, const int64_t* ip, const float* __restrict g, bool has_loss,
                             float* __restrict out, float lo, float hi, float factor) {
  const int64_t rows = s.size(0), cols = s.size(1);
  const float* sp = s.data_ptr<float>();
  const float* tp = t.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* __restrict x = sp + r * cols;
    const float* __restrict b = tp + target_row(ip, r) * t.stride(0);
    float* __restrict o = out + r * cols;
    if (g != nullptr && has_loss) {
      const float* __restrict gr = g + r * cols;
      for (int64_t c = 0; c < cols; ++c) o[c] = (((x[c] > lo) & (x[c] < hi)) ? gr[c] : 0.0f) + (x[c] - b[c]) * factor;
    } else if (g != nullptr) {
      pass_inside_loop(x, g + r * cols, o, cols, lo, hi);
    } else if (has_loss) {
      scaled_difference_loop(x, b, o, cols, factor);
    } else {
      std::fill(o, o + cols, 0.0f);
    }
  }
}

// Fake quantization of a loss tensor fused with its loss term: y = clipped_round(x) and
// loss = weight * mean((x - target[index])^2), a float64 0-d tensor (the loop sums the terms in
// double, like weighted_mse). Backward, one pass: the straight-through gradient of y plus the
// loss's, each as the separate kernels compute it (so the sum is the one the autograd engine made
// of the two). One node instead of a fake quantizer, a loss term and the engine's sum of the two.
struct QuantTapLossFn : public torch::autograd::Function<QuantTapLossFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& target, const std::optional<Tensor>& index_in,
                               double weight, double scale, double low, double high) {
    const Tensor index = row_index(index_in);
    auto [s, t] = as_rows(x, target, index, 0);
    const Tensor y = clipped_round_values(x.is_contiguous() ? x : s, scale, low, high).view(x.sizes());  // no view when x is contiguous
    const double sum = squared_error_sum(s, t, index);
    ctx->save_for_backward({s.detach(), t.detach(), index.defined() ? index : at::empty({0}, at::kLong)});
    ctx->saved_data["indexed"] = index.defined();
    ctx->saved_data["weight"] = weight;
    ctx->saved_data["low"] = low;
    ctx->saved_data["high"] = high;
    ctx->saved_data["sizes"] = x.sizes().vec();
    return {y, scalar(weight * sum / static_cast<double>(std::max<int64_t>(1, s.numel())), at::kDouble)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& s = saved[0];
    const Tensor& t = saved[1];
    const Tensor index = ctx->saved_data["indexed"].toBool() ? saved[2] : Tensor();
    const double low = ctx->saved_data["low"].toDouble(), high = ctx->saved_data["high"].toDouble();
    const std::vector<int64_t> sizes = ctx->saved_data["sizes"].toIntVector();
    const bool has_y = grads[0].defined(), has_loss = grads[1].defined();
    const double factor = has_loss ? 2.0 * ctx->saved_data["weight"].toDouble() / static_cast<double>(std::max<int64_t>(1, s.numel())) *
                                         grads[1].item<double>()
                                   : 0.0;
    Tensor out;
    if (small(s)) {
      out = at::empty_like(s);
      const Tensor g = has_y ? grads[0].contiguous() : Tensor();
      quant_tap_backward_rows(s, t, index_data(index), has_y ? g.data_ptr<float>() : nullptr, has_loss, out.data_ptr<float>(),
                              static_cast<float>(low), static_cast<float>(high), static_cast<float>(factor));
    } else {
      Tensor fq = has_y ? at::hardtanh_backward(grads[0].reshape(s.sizes()), s, low, high) : Tensor();
      Tensor loss = has_loss ? scaled_difference(s, t, index, factor) : Tensor();
      out = !has_loss ? fq : !has_y ? loss : fq.add_(loss);
      if (!out.defined()) out = at::zeros_like(s);
    }
    return {out.view(sizes), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// AdaRound's soft weights and rounding regularizer over the flat V of every weight (the rounding
// bank), with s = sigmoid(V), h = clamp(s * stretch + shift, 0, 1) and t = 2h - 1:
//   soft = floor + h * room                      (floor, room: each weight's clip(floor(w / step)) and
//                                                 where rounding up stays in range, both times step)
//   reg  = sum(share * (1 - |t|^beta))           (share: each weight's weight in the regularizer)
// One node: forward computes both and each one's derivative with respect to V (dsoft/dV, dreg/dV:
// the chain torch differentiates, evaluated once), backward is grad_soft * dsoft/dV + grad_reg *
// dreg/dV. torch's sigmoid and pow (vectorized) do the transcendental parts.
constexpr int64_t GRAIN = 32768;  // elements per task of ATen's thread pool

// h = clamp(pre, 0, 1) with pre = s * stretch + shift, s = sigmoid(V) (pre is also written out,
// for rectified_slope)
inline float rectified(float s, float stretch, float shift, float& pre) {
  pre = s * stretch + shift;
  const float h = pre > 0.0f ? pre : 0.0f;
  return h < 1.0f ? h : 1.0f;
}

// dh/dV at s = sigmoid(V), pre = s * stretch + shift: stretch * s * (1 - s) where 0 <= pre <= 1
// (torch's clamp passes the gradient at the ends), else 0; without branches, so that loops vectorize
inline float rectified_slope(float s, float pre, float stretch) {
  return stretch * ((1.0f - s) * s) * static_cast<float>((pre >= 0.0f) & (pre <= 1.0f));
}

template <bool WITH_U>
void soft_weights_loop(const float* __restrict s, const float* __restrict floor, const float* __restrict room,
                       float* __restrict soft, float* __restrict dsoft, float* __restrict u, int64_t n, float stretch,
                       float shift, float negligible) {
  for (int64_t i = 0; i < n; ++i) {
    float pre;
    const float h = rectified(s[i], stretch, shift, pre);
    soft[i] = floor[i] + h * room[i];
    dsoft[i] = room[i] * rectified_slope(s[i], pre, stretch);
    if (WITH_U) {
      const float t = 2.0f * h - 1.0f;
      const float a = t < 0.0f ? -t : t;
      u[i] = a < negligible ? 0.0f : a;
    }
  }
}

// sum(share * (1 - p)) with p = u^beta, and dreg/dV = share * (-beta u^(beta - 1)) * sign(t) * 2 * dh/dV
float regularizer_loop(const float* __restrict s, const float* __restrict u, const float* __restrict p,
                       const float* __restrict share, float* __restrict dreg, int64_t n, float stretch, float shift,
                       float beta) {
  float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  auto one = [&](int64_t k) {
    float pre;
    const float h = rectified(s[k], stretch, shift, pre);
    const float sign = static_cast<float>(h > 0.5f) - static_cast<float>(h < 0.5f);
    const float power = p[k] / (u[k] > 0.0f ? u[k] : 1.0f);  // u^(beta - 1) (beta > 1: 0 where u is)
    dreg[k] = share[k] * (-2.0f * beta) * power * sign * rectified_slope(s[k], pre, stretch);
    return share[k] * (1.0f - p[k]);
  };
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) lane[j] += one(i + j);
  }
  float total = 0.0f;
  for (; i < n; ++i) total += one(i);
  for (int j = 0; j < 8; ++j) total += lane[j];
  return total;
}

// dsoft * g + r * dreg (G: with a soft-weight gradient g, R: with a regularizer gradient r)
template <bool G, bool R>
void rounding_gradient_loop(const float* __restrict dsoft, const float* __restrict g, const float* __restrict dreg, float r,
                            float* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float value = 0.0f;
    if (G) value = dsoft[i] * g[i];
    if (R) value = value + r * dreg[i];
    out[i] = value;
  }
}

// Returns each weight's soft weight in its shape (views of one buffer: no split and view nodes)
// and the regularizer; backward writes V's gradient in one pass per weight.
struct SoftRoundingFn : public torch::autograd::Function<SoftRoundingFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& v, const Tensor& floor, const Tensor& room, const Tensor& share,
                               std::optional<double> beta, double stretch, double shift, std::vector<std::vector<int64_t>> shapes) {
    const int64_t n = v.numel();
    for (const Tensor* t : {&v, &floor, &room, &share}) {
      TORCH_CHECK(t->numel() == n && t->is_contiguous() && t->scalar_type() == at::kFloat, "soft_rounding: flat float32 tensors of one size");
    }
    std::vector<int64_t> sizes;
    for (const auto& shape : shapes) sizes.push_back(c10::multiply_integers(shape));
    TORCH_CHECK(std::accumulate(sizes.begin(), sizes.end(), int64_t{0}) == n, "soft_rounding: the shapes do not add up to V");
    const Tensor s = at::sigmoid(v);
    Tensor soft = at::empty_like(v), dsoft = at::empty_like(v);
    Tensor u = beta ? at::empty_like(v) : Tensor();
    const float st = static_cast<float>(stretch), sh = static_cast<float>(shift);
    // |2h - 1| below which its beta-th power (< 1e-30) is taken as 0: no subnormal numbers, which
    // make pow many times slower (h near 0.5 at high beta)
    const float negligible = beta ? static_cast<float>(std::pow(1e-30, 1.0 / *beta)) : 0.0f;
    const float *sp = s.data_ptr<float>(), *fp = floor.data_ptr<float>(), *rp = room.data_ptr<float>();
    float *softp = soft.data_ptr<float>(), *dsp = dsoft.data_ptr<float>(), *up = beta ? u.data_ptr<float>() : nullptr;
    at::parallel_for(0, n, GRAIN, [&](int64_t b, int64_t e) {
      if (up != nullptr) {
        soft_weights_loop<true>(sp + b, fp + b, rp + b, softp + b, dsp + b, up + b, e - b, st, sh, negligible);
      } else {
        soft_weights_loop<false>(sp + b, fp + b, rp + b, softp + b, dsp + b, nullptr, e - b, st, sh, negligible);
      }
    });
    Tensor reg = at::zeros({}, v.options()), dreg = at::empty({0}, v.options());
    if (beta) {
      const Tensor p = at::pow(u, *beta);
      dreg = at::empty_like(v);
      const float* pp = p.data_ptr<float>();
      const float* sharep = share.data_ptr<float>();
      float* drp = dreg.data_ptr<float>();
      const float b = static_cast<float>(*beta);
      const double total = at::parallel_reduce(
          0, n, GRAIN, 0.0,
          [&](int64_t lo, int64_t hi, double acc) {
            return acc + regularizer_loop(sp + lo, up + lo, pp + lo, sharep + lo, drp + lo, hi - lo, st, sh, b);
          },
          std::plus<double>());
      reg.fill_(total);
    } else {
      ctx->mark_non_differentiable({reg});  // a zero, like the Python path's
    }
    ctx->save_for_backward({dsoft, dreg});
    ctx->saved_data["regularized"] = beta.has_value();
    ctx->saved_data["sizes"] = sizes;
    variable_list out;
    int64_t offset = 0;
    for (size_t i = 0; i < shapes.size(); ++i) {
      out.push_back(soft.narrow(0, offset, sizes[i]).view(shapes[i]));
      offset += sizes[i];
    }
    out.push_back(reg);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& dsoft = saved[0];
    const Tensor& dreg = saved[1];
    const std::vector<int64_t> sizes = ctx->saved_data["sizes"].toIntVector();
    const bool with_reg = ctx->saved_data["regularized"].toBool() && grads.back().defined();
    const float r = with_reg ? static_cast<float>(grads.back().item<double>()) : 0.0f;
    Tensor out = at::empty_like(dsoft);
    const float* dp = dsoft.data_ptr<float>();
    const float* drp = with_reg ? dreg.data_ptr<float>() : nullptr;
    float* op = out.data_ptr<float>();
    int64_t offset = 0;
    for (size_t i = 0; i < sizes.size(); ++i) {
      const Tensor g = grads[i].defined() ? grads[i].contiguous() : Tensor();
      const float* gp = g.defined() ? g.data_ptr<float>() : nullptr;
      at::parallel_for(offset, offset + sizes[i], GRAIN, [&](int64_t b, int64_t e) {
        const float* gb = gp != nullptr ? gp + (b - offset) : nullptr;
        if (gb != nullptr && drp != nullptr) rounding_gradient_loop<true, true>(dp + b, gb, drp + b, r, op + b, e - b);
        else if (gb != nullptr) rounding_gradient_loop<true, false>(dp + b, gb, nullptr, r, op + b, e - b);
        else if (drp != nullptr) rounding_gradient_loop<false, true>(dp + b, nullptr, drp + b, r, op + b, e - b);
        else std::fill(op + b, op + e, 0.0f);
      });
      offset += sizes[i];
    }
    return {out, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// The sum of float64 0-d loss terms, as float32 (the step's reconstruction loss): one node instead
// of stacking the terms, summing and converting (each term's gradient is the sum's, in float64).
struct SumTermsFn : public torch::autograd::Function<SumTermsFn> {
  static Tensor forward(AutogradContext* ctx, at::TensorList terms) {
    double total = 0.0;
    for (const Tensor& t : terms) total += t.item<double>();
    ctx->saved_data["count"] = static_cast<int64_t>(terms.size());
    return scalar(total, at::kFloat);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor g = grads[0].to(at::kDouble);
    return variable_list(static_cast<size_t>(ctx->saved_data["count"].toInt()), g);
  }
};

// clamp(round(b / step), -limit, limit) * step (an int32 bias grid) with a straight-through
// gradient to b and none to the fixed step; ATen's ops in their Python order (equal values).
struct RoundToGridFn : public torch::autograd::Function<RoundToGridFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& b, const Tensor& step, double limit) {
    return at::clamp(at::round(b / step), -limit, limit) * step;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) { return {grads[0], Tensor(), Tensor()}; }
};

}  // namespace

Tensor clipped_round(const Tensor& x, double scale, double low, double high) {
  return ClippedRoundFn::apply(x, scale, low, high);
}

Tensor weighted_mse(const std::vector<Tensor>& students, const std::vector<Tensor>& targets, const std::vector<double>& weights,
                    const std::optional<Tensor>& index) {
  return WeightedMseFn::apply(at::TensorList(students), at::TensorList(targets), weights, index);
}

std::vector<Tensor> quant_tap_loss(const Tensor& x, const Tensor& target, const std::optional<Tensor>& index, double weight,
                                   double scale, double low, double high) {
  return QuantTapLossFn::apply(x, target, index, weight, scale, low, high);
}

std::vector<Tensor> soft_rounding(const Tensor& v, const Tensor& floor, const Tensor& room, const Tensor& share,
                                  std::optional<double> beta, double stretch, double shift,
                                  const std::vector<std::vector<int64_t>>& shapes) {
  return SoftRoundingFn::apply(v, floor, room, share, beta, stretch, shift, shapes);
}

Tensor sum_terms(const std::vector<Tensor>& terms) { return SumTermsFn::apply(at::TensorList(terms)); }

Tensor round_to_grid(const Tensor& b, const Tensor& step, double limit) { return RoundToGridFn::apply(b, step, limit); }

// One update of torch.optim.RAdam / Adam (defaults: no weight decay, amsgrad or maximize) on one
// tensor: the ATen ops torch.optim's foreach implementation runs on a CPU tensor, in its order,
// with its scalars computed as it computes them (so bit-identical results), without its Python
// overhead (a few hundred microseconds a step on a small model). ``step``: the update's number, from 1.
void radam_update(Tensor param, const Tensor& grad, Tensor exp_avg, Tensor exp_avg_sq, double step, double lr, double beta1,
                  double beta2, double eps) {
  at::NoGradGuard no_grad;
  const double rho_inf = 2 / (1 - beta2) - 1;
  const double rho_t = rho_inf - 2 * step * std::pow(beta2, step) / (1 - std::pow(beta2, step));
  exp_avg.lerp_(grad, 1 - beta1);
  exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2);
  const double rect =
      rho_t > 5 ? std::pow((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t), 0.5) : 0.0;
  const double unrectified = rect > 0 ? 0.0 : 1.0;
  const double bias_correction1 = 1 - std::pow(beta1, step);
  const double unrect_step_size = (lr * unrectified / bias_correction1) * -1;
  const double bias_correction2 = std::pow(1 - std::pow(beta2, step), 0.5) * (lr * rect / bias_correction1) * -1;
  Tensor buffer = exp_avg_sq.sqrt();
  buffer.add_(eps).div_(bias_correction2).reciprocal_().add_(unrect_step_size);
  param.addcmul_(exp_avg, buffer);
}

void adam_update(Tensor param, const Tensor& grad, Tensor exp_avg, Tensor exp_avg_sq, double step, double lr, double beta1,
                 double beta2, double eps) {
  at::NoGradGuard no_grad;
  exp_avg.lerp_(grad, 1 - beta1);
  exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2);
  const double bias_correction1 = 1 - std::pow(beta1, step);
  const double bias_correction2 = 1 - std::pow(beta2, step);
  const double step_size = (lr / bias_correction1) * -1;
  Tensor denom = exp_avg_sq.sqrt();
  denom.div_(std::pow(bias_correction2, 0.5)).add_(eps);
  param.addcdiv_(exp_avg, denom, step_size);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("clipped_round", &clipped_round, "Fake quantization with a fixed step and a straight-through gradient (float32, CPU)");
  m.def("weighted_mse", &weighted_mse, "sum of weights[k] * mean((students[k] - targets[k][index])^2) (float32, CPU)",
        py::arg("students"), py::arg("targets"), py::arg("weights"), py::arg("index") = py::none());
  m.def("radam_update", &radam_update, "one torch.optim.RAdam update of one tensor (bit-identical)");
  m.def("adam_update", &adam_update, "one torch.optim.Adam update of one tensor (bit-identical)");
  m.def("soft_rounding", &soft_rounding,
        "[floor + h(V) * room, split into the given shapes..., sum(share * (1 - |2 h(V) - 1|^beta))] in one node, "
        "h the rectified sigmoid (float32, CPU)",
        py::arg("v"), py::arg("floor"), py::arg("room"), py::arg("share"), py::arg("beta"), py::arg("stretch"), py::arg("shift"),
        py::arg("shapes"));
  m.def("sum_terms", &sum_terms, "the sum of float64 0-d loss terms, as float32, in one node");
  m.def("round_to_grid", &round_to_grid, "clamp(round(b / step), -limit, limit) * step, straight-through gradient to b");
  m.def("quant_tap_loss", &quant_tap_loss,
        "(clipped_round(x), weight * mean((x - target[index])^2) as float64) in one node (float32, CPU)",
        py::arg("x"), py::arg("target"), py::arg("index"), py::arg("weight"), py::arg("scale"), py::arg("low"), py::arg("high"));
}
