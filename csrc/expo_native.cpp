// Native CPU backend of expo_kernels: fused LM-head projection + log-softmax + label gather,
// and the two-head token KL, for CPU tensors (fp32 / bf16 / fp16 with fp32 accumulation, fp64 in
// fp64). The readable specification is expo_kernels/ops/torch_backend.py; this file follows it.
//
// Layout of every pass: vocab tiles outer, token blocks inner.
//   * one GEMM per (vocab tile, token block) writes the raw logits into a preallocated
//     [token_block x vocab_tile] buffer (ATen/MKL GEMM, multi-threaded by ATen),
//   * one fused loop per row (rows split across threads with at::parallel_for) applies bias and
//     transform, updates the online log-sum-exp state of its token (forward) or turns the row into
//     dz = g (onehot - p) dz/draw in place (backward),
//   * backward then runs two more GEMMs on the tile: d_hidden[block] += dz @ W_tile and
//     d_weight[tile] (+)= dz^T @ h_block. Each d_weight tile is written by one GEMM at a time (the
//     GEMM itself is threaded), so there are no data races and results are deterministic.
// The vocab-outer order converts each low-precision weight tile to fp32 once per pass and, in
// backward, finishes a d_weight tile before moving on, so bf16/fp16 weights need only a
// tile-sized fp32 accumulator. Nothing of size tokens x vocab is ever allocated.
//
// Ops are registered with TORCH_LIBRARY (namespace expo_native) and called from Python through
// torch.ops.expo_native.*; see expo_kernels/ops/native_backend.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace expo_native {
namespace {

using at::Tensor;

// ------------------------------------------------------------------------------------------
// exp: a vectorizable float exp (range reduction to [-ln2/2, ln2/2], degree-6 polynomial,
// ~2 ulp), NaN-propagating, exactly 0 below the smallest normal result (so exp(-inf) = 0).
// double uses std::exp (float64 is for gradcheck-size problems).
// ------------------------------------------------------------------------------------------

static inline float exp_acc(float x) {
  const float hi = 88.37626f;
  const float lo = -87.33654f;
  float xc = x > hi ? hi : x;  // comparisons with NaN are false: NaN passes through
  xc = xc < lo ? lo : xc;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float t = xc * 1.44269504088896341f + magic;
  float n = t - magic;
  float r = xc - n * 0.693359375f;  // ln2 split into a short high part and a correction
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t ti;
  std::memcpy(&ti, &t, sizeof(ti));
  int32_t bits = (ti - 0x4B400000 + 127) << 23;  // integer n from the rounding trick, biased
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float result = p * scale;
  return x < lo ? 0.0f : result;
}

static inline double exp_acc(double x) { return std::exp(x); }

// tanh from exp_acc, vectorizable: sign(x) (1 - e) / (1 + e) with e = exp(-2|x|); an odd
// polynomial below |x| = 1/16, where 1 - e would cancel (relative error ~1e-7 throughout).
static inline float tanh_acc(float x) {
  const float ax = std::fabs(x);
  const float e = exp_acc(-2.0f * ax);
  float t = (1.0f - e) / (1.0f + e);
  t = x < 0.0f ? -t : t;
  const float x2 = x * x;
  const float small = x * (1.0f + x2 * (-0.333333333f + x2 * (0.133333333f + x2 * -0.0539682540f)));
  return ax < 0.0625f ? small : t;
}

static inline double tanh_acc(double x) { return std::tanh(x); }

// The running max as the shift of exp(z - shift): 0 while a token has seen only masked (-inf) logits.
template <typename T>
static inline T safe_shift(T m) {
  return m > -std::numeric_limits<T>::infinity() ? m : T(0);
}

// p = exp(z - lse) clamped to 1: a recomputed logit may round a hair above the saved lse (at |z| ~ 1e30
// that hair is ~1e23, and exp of it overflows).
template <typename T>
static inline T prob(T z, T lse) {
  const T x = z - lse;
  return exp_acc(x < T(0) ? x : T(0));
}

template <typename T>
struct Transform {
  // z = softcap * tanh(raw * scale / softcap) * inv_temp; plain scale * inv_temp without softcap.
  T scale;
  T softcap;
  T inv_temp;
  bool has_softcap;
  bool identity;

  Transform(double s, c10::optional<double> c, double it)
      : scale(static_cast<T>(s)),
        softcap(static_cast<T>(c.has_value() ? *c : 1.0)),
        inv_temp(static_cast<T>(it)),
        has_softcap(c.has_value()),
        identity(!c.has_value() && s == 1.0 && it == 1.0) {}

  inline T apply(T raw) const {
    if (!has_softcap) return raw * (scale * inv_temp);
    return softcap * tanh_acc(raw * scale / softcap) * inv_temp;
  }
  // dz/draw at raw
  inline T deriv(T raw) const {
    if (!has_softcap) return scale * inv_temp;
    T t = tanh_acc(raw * scale / softcap);
    return scale * inv_temp * (T(1) - t * t);
  }
};

// Bias and transform on one row of raw logits, in place. `b` always points at a bias row (zeros
// when the head has none) so that the loops carry no branch and vectorize.
template <typename T>
inline void apply_transform_row(T* z, const T* b, int64_t vt, const Transform<T>& tf, bool has_bias) {
  if (!has_bias && tf.identity) return;
  if (!tf.has_softcap) {
    const T mul = tf.scale * tf.inv_temp;
#pragma omp simd
    for (int64_t j = 0; j < vt; ++j) z[j] = (z[j] + b[j]) * mul;
  } else {
    const T pre = tf.scale / tf.softcap, post = tf.softcap * tf.inv_temp;
#pragma omp simd
    for (int64_t j = 0; j < vt; ++j) z[j] = post * tanh_acc((z[j] + b[j]) * pre);
  }
}

// The head's bias in acc dtype, or zeros [V] when it has none.
inline Tensor bias_or_zeros(const c10::optional<Tensor>& bias, int64_t V, const at::TensorOptions& opts) {
  if (bias.has_value() && bias->defined()) return bias->to(opts.dtype()).contiguous();
  return at::zeros({V}, opts);
}

template <typename T>
constexpr at::ScalarType acc_type();
template <>
constexpr at::ScalarType acc_type<float>() { return at::kFloat; }
template <>
constexpr at::ScalarType acc_type<double>() { return at::kDouble; }

// Rows per thread at least: about 64k elements, so that small problems stay on one thread
// (waking a thread team costs more than they do).
inline int64_t row_grain(int64_t vt) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(vt, 1)); }

// The rows [t0, t0 + nb) of a [*, cols] tensor as a contiguous [nb, cols] view of acc dtype.
// `whole` is the input already converted (or not) to acc dtype.
inline Tensor rows(const Tensor& whole, int64_t r0, int64_t n) { return whole.narrow(0, r0, n); }

// A contiguous [nb, vt] view on the first nb * vt elements of a flat buffer.
inline Tensor tile_view(const Tensor& flat, int64_t nb, int64_t vt) {
  return flat.narrow(0, 0, nb * vt).view({nb, vt});
}

// Weight tile [vt, H] in acc dtype: a view when the weight already is, else converted into buf.
inline Tensor weight_tile(const Tensor& weight, int64_t v0, int64_t vt, at::ScalarType acc, Tensor& buf) {
  Tensor w = weight.narrow(0, v0, vt);
  if (weight.scalar_type() == acc) return w;
  const int64_t h = weight.size(1);
  Tensor out = buf.narrow(0, 0, vt * h).view({vt, h});
  out.copy_(w);
  return out;
}

inline int64_t balanced_block(int64_t n, int64_t block) {
  if (n <= 0) return 1;
  block = std::max<int64_t>(1, block);
  const int64_t pieces = (n + block - 1) / block;
  return (n + pieces - 1) / pieces;
}

void check_inputs(const Tensor& hidden, const Tensor& weight, const c10::optional<Tensor>& bias) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu(), "expo_native: CPU tensors only");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "expo_native: hidden [N, H] and weight [V, H] expected");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "expo_native: bias [V] expected");
  }
}

Tensor to_acc(const Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

// ------------------------------------------------------------------------------------------
// The fold of one row of logits into a token's running partial state (the field order of
// expo_kernels.ops.state.LogprobState): shared by the fused forward and the engine's fold op.
// ------------------------------------------------------------------------------------------

template <typename T>
struct RowState {
  T *m, *s, *zl, *sz, *s2, *zs, *mb;  // [N] each; the last four null without statistics
};

// The partial state of N tokens before any logit (the identity of the merge), as returned to Python:
// m = -inf, s = z_label = 0, and with statistics sz = s2 = z_sum = 0, max_before = -inf.
template <typename T>
std::vector<Tensor> empty_state(int64_t N, const at::TensorOptions& opts, bool with_stats) {
  const T ninf = -std::numeric_limits<T>::infinity();
  std::vector<Tensor> st = {at::full({N}, ninf, opts), at::zeros({N}, opts), at::zeros({N}, opts)};
  if (with_stats) {
    for (int k = 0; k < 3; ++k) st.push_back(at::zeros({N}, opts));
    st.push_back(at::full({N}, ninf, opts));
  }
  return st;
}

template <typename T>
RowState<T> row_state(const std::vector<Tensor>& st) {
  const bool stats = st.size() == 7;
  return {st[0].data_ptr<T>(), st[1].data_ptr<T>(), st[2].data_ptr<T>(), stats ? st[3].data_ptr<T>() : nullptr,
          stats ? st[4].data_ptr<T>() : nullptr, stats ? st[5].data_ptr<T>() : nullptr,
          stats ? st[6].data_ptr<T>() : nullptr};
}

// z: one row of raw logits (ids v0 + [0, vt)), transformed in place; yl: the label's column in this
// row (outside [0, vt) when the label lies elsewhere); i: the token. Always inlined: called out of line
// from the parallel_for lambdas, GCC does not vectorize the `omp simd` reductions, and the sequential
// float32 sums are ~3x less accurate (lse 3e-6 vs 9e-7 absolute at V = 5000).
template <typename T>
__attribute__((always_inline)) inline void fold_row(T* z, const T* b, int64_t vt, const Transform<T>& tf, bool has_bias, int64_t yl,
                     const RowState<T>& st, int64_t i) {
  const T ninf = -std::numeric_limits<T>::infinity();
  apply_transform_row<T>(z, b, vt, tf, has_bias);
  // tile max, split at the label so that the maximum before the label comes for free
  const int64_t cut = std::min<int64_t>(std::max<int64_t>(yl, 0), vt);
  T mx_before = ninf, mx_after = ninf;
#pragma omp simd reduction(max : mx_before)
  for (int64_t j = 0; j < cut; ++j) mx_before = std::max(mx_before, z[j]);
#pragma omp simd reduction(max : mx_after)
  for (int64_t j = cut; j < vt; ++j) mx_after = std::max(mx_after, z[j]);
  const T mt = std::max(mx_before, mx_after);
  const T m_old = st.m[i];
  const T m_new = std::max(m_old, mt);
  // shift 0 while only masked (-inf) logits were seen: exp(-inf - 0) = 0, never -inf - (-inf)
  const T shift = safe_shift(m_new);
  const T rescale = m_old == ninf ? T(0) : exp_acc(m_old - shift);
  T se = 0;
  if (st.sz == nullptr) {
#pragma omp simd reduction(+ : se)
    for (int64_t j = 0; j < vt; ++j) se += exp_acc(z[j] - shift);
  } else {
    T sez = 0, se2 = 0, zsum = 0;
#pragma omp simd reduction(+ : se, sez, se2, zsum)
    for (int64_t j = 0; j < vt; ++j) {
      const T e = exp_acc(z[j] - shift);
      se += e;
      // shifted products (entropy without cancellation at large |z|); masked entries add 0
      sez += e > T(0) ? e * (z[j] - shift) : T(0);
      se2 += e * e;
      zsum += z[j] > ninf ? z[j] : T(0);
    }
    // sum e^(z - m_new)(z - m_new) = rescale * (sz + (m_old - m_new) s) + this tile's terms
    st.sz[i] = rescale * (st.sz[i] + (st.s[i] > T(0) ? (m_old - shift) * st.s[i] : T(0))) + sez;
    st.s2[i] = st.s2[i] * rescale * rescale + se2;
    st.zs[i] += zsum;
    st.mb[i] = std::max(st.mb[i], mx_before);
  }
  // NaN in the tile: make it reach s (std::max above drops NaN from the maxima)
  st.s[i] = st.s[i] * rescale + se;
  st.m[i] = m_new;
  if (yl >= 0 && yl < vt) st.zl[i] = z[yl];
}

// ------------------------------------------------------------------------------------------
// Running top-k of one token over a row of transformed logits z (ids id0 + [0, vt)); `seen` ids of
// this range were folded before. vals/ids [k] stay sorted by (value descending, id ascending):
// ids arrive in increasing order, so a new entry ranks below every equal one already kept and
// enters only while fewer than k ids were seen or when strictly above the k-th value (one compare
// per logit in the common case). Masked (-inf) entries fill slots only while k are not yet seen.
// ------------------------------------------------------------------------------------------

template <typename T>
inline void topk_row(const T* z, int64_t vt, int64_t id0, int64_t seen, int64_t k, T* vals, int64_t* ids) {
  for (int64_t j = 0; j < vt; ++j) {
    const T x = z[j];
    int64_t pos;
    if (seen + j < k) {
      pos = seen + j;  // the first empty slot
    } else if (x > vals[k - 1]) {
      pos = k - 1;  // replaces the current k-th
    } else {
      continue;
    }
    while (pos > 0 && vals[pos - 1] < x) {  // strict: an equal earlier (lower) id stays in front
      vals[pos] = vals[pos - 1];
      ids[pos] = ids[pos - 1];
      --pos;
    }
    vals[pos] = x;
    ids[pos] = id0 + j;
  }
}

// ------------------------------------------------------------------------------------------
// linear_logprobs forward
// ------------------------------------------------------------------------------------------

template <typename T>
std::vector<Tensor> forward_impl(const Tensor& hidden_in, const Tensor& weight_in, const c10::optional<Tensor>& bias_in,
                                 const Tensor& labels_in, double scale, c10::optional<double> softcap,
                                 double inv_temp, bool with_stats, int64_t vocab_start, int64_t token_block,
                                 int64_t vocab_tile, int64_t topk) {
  const at::ScalarType acc = acc_type<T>();
  const int64_t N = hidden_in.size(0), V = weight_in.size(0), H = weight_in.size(1);
  auto opts = hidden_in.options().dtype(acc);
  Tensor hidden = to_acc(hidden_in, acc);
  Tensor weight = weight_in.contiguous();
  Tensor labels = labels_in.to(at::kLong).contiguous();
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  Tensor bias = bias_or_zeros(bias_in, V, opts);
  const Transform<T> tf(scale, softcap, inv_temp);

  std::vector<Tensor> state = empty_state<T>(N, opts, with_stats);
  // top-k slots not yet filled: -inf and the pad id (expo_kernels.ops.state.TOPK_PAD_ID)
  Tensor top_vals, top_ids;
  if (topk > 0) {
    top_vals = at::full({N, topk}, -std::numeric_limits<T>::infinity(), opts);
    top_ids = at::full({N, topk}, std::numeric_limits<int64_t>::max(), opts.dtype(at::kLong));
  }
  if (N > 0 && V > 0) {
    const int64_t nb_max = std::min(N, balanced_block(N, token_block));
    const int64_t vt_max = std::min(V, std::max<int64_t>(1, vocab_tile));
    Tensor tile_buf = at::empty({nb_max * vt_max}, opts);
    Tensor wbuf = weight.scalar_type() == acc ? Tensor() : at::empty({vt_max * H}, opts);
    const RowState<T> st = row_state<T>(state);
    const int64_t* y = labels.data_ptr<int64_t>();
    const T* bptr = bias.data_ptr<T>();

    for (int64_t v0 = 0; v0 < V; v0 += vt_max) {
      const int64_t vt = std::min(vt_max, V - v0);
      Tensor w = weight_tile(weight, v0, vt, acc, wbuf);
      Tensor wt = w.t();
      for (int64_t t0 = 0; t0 < N; t0 += nb_max) {
        const int64_t nb = std::min(nb_max, N - t0);
        Tensor tile = tile_view(tile_buf, nb, vt);
        at::mm_out(tile, rows(hidden, t0, nb), wt);
        T* base = tile.data_ptr<T>();
        at::parallel_for(0, nb, row_grain(vt), [&](int64_t r_begin, int64_t r_end) {
          for (int64_t r = r_begin; r < r_end; ++r) {
            const int64_t i = t0 + r;
            fold_row<T>(base + r * vt, bptr + v0, vt, tf, has_bias, y[i] - vocab_start - v0, st, i);
            if (topk > 0) {  // the row is transformed in place by fold_row
              topk_row<T>(base + r * vt, vt, vocab_start + v0, v0, topk, top_vals.data_ptr<T>() + i * topk,
                          top_ids.data_ptr<int64_t>() + i * topk);
            }
          }
        });
      }
    }
  }
  if (topk > 0) {
    state.push_back(top_vals);
    state.push_back(top_ids);
  }
  return state;  // the raw partial state (expo_kernels.ops.state.LogprobState field order); Python finalizes
}

std::vector<Tensor> logprobs_forward(const Tensor& hidden, const Tensor& weight, const c10::optional<Tensor>& bias,
                                     const Tensor& labels, double scale, c10::optional<double> softcap,
                                     double inv_temp, bool with_stats, int64_t vocab_start, int64_t token_block,
                                     int64_t vocab_tile, int64_t topk) {
  check_inputs(hidden, weight, bias);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == hidden.size(0), "expo_native: labels [N] expected");
  TORCH_CHECK(topk >= 0, "expo_native: topk >= 0 expected");
  if (hidden.scalar_type() == at::kDouble) {
    return forward_impl<double>(hidden, weight, bias, labels, scale, softcap, inv_temp, with_stats, vocab_start,
                                token_block, vocab_tile, topk);
  }
  return forward_impl<float>(hidden, weight, bias, labels, scale, softcap, inv_temp, with_stats, vocab_start,
                             token_block, vocab_tile, topk);
}

// ------------------------------------------------------------------------------------------
// Shared backward driver: for each (vocab tile, token block), `make_dz` turns the tile into dz in
// place (given the tile's raw policy logits), then the gradient GEMMs run.
// ------------------------------------------------------------------------------------------

struct GradOut {
  Tensor d_hidden, d_weight, d_bias;  // undefined when not asked for
};

template <typename T, typename RowFn, typename PrepFn>
GradOut backward_driver(const Tensor& hidden_acc, const Tensor& weight,
                        const Tensor& bias_in_dtype, bool need_h, bool need_w, bool need_b,
                        int64_t token_block, int64_t vocab_tile, int64_t n_extra_tiles, PrepFn prep_block,
                        RowFn row_fn) {
  const at::ScalarType acc = acc_type<T>();
  const int64_t N = hidden_acc.size(0), V = weight.size(0), H = weight.size(1);
  auto opts = hidden_acc.options().dtype(acc);
  GradOut out;
  Tensor dh_acc = need_h ? at::zeros({N, H}, opts) : Tensor();
  const bool w_direct = weight.scalar_type() == acc;
  if (need_w) out.d_weight = at::empty({V, H}, weight.options());
  Tensor db_acc = need_b ? at::zeros({V}, opts) : Tensor();
  if (N > 0 && V > 0 && (need_h || need_w || need_b)) {
    const int64_t nb_max = std::min(N, balanced_block(N, token_block));
    const int64_t vt_max = std::min(V, std::max<int64_t>(1, vocab_tile));
    Tensor tile_buf = at::empty({nb_max * vt_max}, opts);
    std::vector<Tensor> extra;
    for (int64_t k = 0; k < n_extra_tiles; ++k) extra.push_back(at::empty({nb_max * vt_max}, opts));
    Tensor wbuf = w_direct ? Tensor() : at::empty({vt_max * H}, opts);
    Tensor dwbuf = (need_w && !w_direct) ? at::empty({vt_max * H}, opts) : Tensor();
    for (int64_t v0 = 0; v0 < V; v0 += vt_max) {
      const int64_t vt = std::min(vt_max, V - v0);
      Tensor w = weight_tile(weight, v0, vt, acc, wbuf);
      Tensor dw;
      if (need_w) dw = w_direct ? out.d_weight.narrow(0, v0, vt) : dwbuf.narrow(0, 0, vt * H).view({vt, H});
      bool dw_started = false;
      for (int64_t t0 = 0; t0 < N; t0 += nb_max) {
        const int64_t nb = std::min(nb_max, N - t0);
        Tensor tile = tile_view(tile_buf, nb, vt);
        Tensor h = rows(hidden_acc, t0, nb);
        at::mm_out(tile, h, w.t());
        std::vector<Tensor> extra_tiles;
        for (auto& e : extra) extra_tiles.push_back(tile_view(e, nb, vt));
        prep_block(v0, vt, t0, nb, extra_tiles);
        T* base = tile.data_ptr<T>();
        std::vector<T*> extra_ptrs;
        for (auto& e : extra_tiles) extra_ptrs.push_back(e.data_ptr<T>());
        at::parallel_for(0, nb, row_grain(vt), [&](int64_t r_begin, int64_t r_end) {
          for (int64_t r = r_begin; r < r_end; ++r) row_fn(base + r * vt, extra_ptrs, r, t0 + r, v0, vt);
        });
        if (need_h) {
          Tensor dh = dh_acc.narrow(0, t0, nb);
          dh.addmm_(tile, w);
        }
        if (need_w) {
          if (!dw_started) {
            at::mm_out(dw, tile.t(), h);
            dw_started = true;
          } else {
            dw.addmm_(tile.t(), h);
          }
        }
        if (need_b) db_acc.narrow(0, v0, vt).add_(tile.sum(0));
      }
      if (need_w && !w_direct) out.d_weight.narrow(0, v0, vt).copy_(dw);
    }
  } else if (need_w) {
    out.d_weight.zero_();
  }
  if (need_h) out.d_hidden = dh_acc.scalar_type() == weight.scalar_type() ? dh_acc : dh_acc.to(weight.scalar_type());
  if (need_b) out.d_bias = db_acc.to(bias_in_dtype.scalar_type());
  return out;
}

template <typename T>
std::vector<Tensor> backward_impl(const Tensor& grad_in, const Tensor& hidden_in, const Tensor& weight_in,
                                  const c10::optional<Tensor>& bias_in, const Tensor& labels_in, const Tensor& lse_in,
                                  double scale, c10::optional<double> softcap, double inv_temp, bool need_h,
                                  bool need_w, bool need_b, int64_t vocab_start, int64_t token_block,
                                  int64_t vocab_tile) {
  const at::ScalarType acc = acc_type<T>();
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  need_b = need_b && has_bias;
  Tensor hidden = to_acc(hidden_in, acc);
  Tensor weight = weight_in.contiguous();
  Tensor labels = labels_in.to(at::kLong).contiguous();
  Tensor g_t = to_acc(grad_in, acc), lse_t = to_acc(lse_in, acc);
  Tensor bias = bias_or_zeros(bias_in, weight_in.size(0), hidden.options());
  const Transform<T> tf(scale, softcap, inv_temp);
  const int64_t* y = labels.data_ptr<int64_t>();
  const T* g = g_t.data_ptr<T>();
  const T* lse = lse_t.data_ptr<T>();
  const T* bptr = bias.data_ptr<T>();

  auto row_fn = [&](T* z, const std::vector<T*>&, int64_t, int64_t i, int64_t v0, int64_t vt) {
    const T gi = g[i], li = lse[i];
    const T* b = bptr + v0;
    const int64_t yl = y[i] - vocab_start - v0;
    const bool label_here = yl >= 0 && yl < vt;
    T d_label = 0;
    if (label_here) d_label = tf.deriv(z[yl] + b[yl]);
    if (!tf.has_softcap) {
      const T mul = tf.scale * tf.inv_temp;
      const T coef = -gi * mul;
#pragma omp simd
      for (int64_t j = 0; j < vt; ++j) z[j] = coef * prob((z[j] + b[j]) * mul, li);
    } else {
      const T pre = tf.scale / tf.softcap, post = tf.softcap * tf.inv_temp, dmul = tf.scale * tf.inv_temp;
#pragma omp simd
      for (int64_t j = 0; j < vt; ++j) {
        const T t = tanh_acc((z[j] + b[j]) * pre);
        z[j] = -gi * prob(post * t, li) * (dmul * (T(1) - t * t));
      }
    }
    if (label_here) z[yl] += gi * d_label;
  };
  auto prep = [](int64_t, int64_t, int64_t, int64_t, std::vector<Tensor>&) {};
  GradOut o = backward_driver<T>(hidden, weight, has_bias ? *bias_in : Tensor(), need_h, need_w, need_b,
                                 token_block, vocab_tile, 0, prep, row_fn);
  if (o.d_hidden.defined()) o.d_hidden = o.d_hidden.to(hidden_in.scalar_type());
  return {o.d_hidden.defined() ? o.d_hidden : at::empty({0}, hidden_in.options()),
          o.d_weight.defined() ? o.d_weight : at::empty({0}, weight_in.options()),
          o.d_bias.defined() ? o.d_bias : at::empty({0}, weight_in.options())};
}

std::vector<Tensor> logprobs_backward(const Tensor& grad, const Tensor& hidden, const Tensor& weight,
                                      const c10::optional<Tensor>& bias, const Tensor& labels, const Tensor& lse,
                                      double scale, c10::optional<double> softcap, double inv_temp, bool need_h,
                                      bool need_w, bool need_b, int64_t vocab_start, int64_t token_block,
                                      int64_t vocab_tile) {
  check_inputs(hidden, weight, bias);
  if (hidden.scalar_type() == at::kDouble) {
    return backward_impl<double>(grad, hidden, weight, bias, labels, lse, scale, softcap, inv_temp, need_h, need_w,
                                 need_b, vocab_start, token_block, vocab_tile);
  }
  return backward_impl<float>(grad, hidden, weight, bias, labels, lse, scale, softcap, inv_temp, need_h, need_w,
                              need_b, vocab_start, token_block, vocab_tile);
}

// ------------------------------------------------------------------------------------------
// Token KL(ref || policy) forward: running (max, sum) of both heads and the running
// sum e^(zr - m_r) (zr - zp).
// ------------------------------------------------------------------------------------------

template <typename T>
inline T row_max(const T* z, int64_t vt) {
  T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < vt; ++j) mx = std::max(mx, z[j]);
  return mx;
}

template <typename T>
std::vector<Tensor> kl_forward_impl(const Tensor& hidden_in, const Tensor& weight_in, const c10::optional<Tensor>& bias_in,
                                    const Tensor& ref_hidden_in, const Tensor& ref_weight_in,
                                    const c10::optional<Tensor>& ref_bias_in, double scale,
                                    c10::optional<double> softcap, double inv_temp, int64_t token_block,
                                    int64_t vocab_tile) {
  const at::ScalarType acc = acc_type<T>();
  const int64_t N = hidden_in.size(0), V = weight_in.size(0), H = weight_in.size(1), Hr = ref_weight_in.size(1);
  auto opts = hidden_in.options().dtype(acc);
  Tensor hidden = to_acc(hidden_in, acc), ref_hidden = to_acc(ref_hidden_in, acc);
  Tensor weight = weight_in.contiguous(), ref_weight = ref_weight_in.contiguous();
  const bool has_b = bias_in.has_value() && bias_in->defined();
  const bool has_rb = ref_bias_in.has_value() && ref_bias_in->defined();
  Tensor bias = bias_or_zeros(bias_in, weight_in.size(0), hidden.options());
  Tensor ref_bias = bias_or_zeros(ref_bias_in, weight_in.size(0), hidden.options());
  const Transform<T> tf(scale, softcap, inv_temp);
  const T ninf = -std::numeric_limits<T>::infinity();
  Tensor mp_t = at::full({N}, ninf, opts), mr_t = at::full({N}, ninf, opts);
  Tensor sp_t = at::zeros({N}, opts), sr_t = at::zeros({N}, opts), cross_t = at::zeros({N}, opts);
  if (N > 0 && V > 0) {
    const int64_t nb_max = std::min(N, balanced_block(N, token_block));
    const int64_t vt_max = std::min(V, std::max<int64_t>(1, vocab_tile));
    Tensor pbuf = at::empty({nb_max * vt_max}, opts), rbuf = at::empty({nb_max * vt_max}, opts);
    Tensor wbuf = weight.scalar_type() == acc ? Tensor() : at::empty({vt_max * H}, opts);
    Tensor rwbuf = ref_weight.scalar_type() == acc ? Tensor() : at::empty({vt_max * Hr}, opts);
    T *mp = mp_t.data_ptr<T>(), *mr = mr_t.data_ptr<T>(), *sp = sp_t.data_ptr<T>(), *sr = sr_t.data_ptr<T>();
    T* cross = cross_t.data_ptr<T>();
    const T* bp = bias.data_ptr<T>();
    const T* brp = ref_bias.data_ptr<T>();
    for (int64_t v0 = 0; v0 < V; v0 += vt_max) {
      const int64_t vt = std::min(vt_max, V - v0);
      Tensor w = weight_tile(weight, v0, vt, acc, wbuf);
      Tensor rw = weight_tile(ref_weight, v0, vt, acc, rwbuf);
      for (int64_t t0 = 0; t0 < N; t0 += nb_max) {
        const int64_t nb = std::min(nb_max, N - t0);
        Tensor zp_tile = tile_view(pbuf, nb, vt), zr_tile = tile_view(rbuf, nb, vt);
        at::mm_out(zp_tile, rows(hidden, t0, nb), w.t());
        at::mm_out(zr_tile, rows(ref_hidden, t0, nb), rw.t());
        T* pb = zp_tile.data_ptr<T>();
        T* rb = zr_tile.data_ptr<T>();
        at::parallel_for(0, nb, row_grain(vt), [&](int64_t r_begin, int64_t r_end) {
          for (int64_t r = r_begin; r < r_end; ++r) {
            const int64_t i = t0 + r;
            T* zp = pb + r * vt;
            T* zr = rb + r * vt;
            apply_transform_row<T>(zp, bp + v0, vt, tf, has_b);
            apply_transform_row<T>(zr, brp + v0, vt, tf, has_rb);
            const T mp_new = std::max(mp[i], row_max(zp, vt));
            const T mr_new = std::max(mr[i], row_max(zr, vt));
            const T shift_p = safe_shift(mp_new), shift_r = safe_shift(mr_new);
            const T resc_p = mp[i] == ninf ? T(0) : exp_acc(mp[i] - shift_p);
            const T resc_r = mr[i] == ninf ? T(0) : exp_acc(mr[i] - shift_r);
            T sep = 0, ser = 0, sc = 0;
#pragma omp simd reduction(+ : sep, ser, sc)
            for (int64_t j = 0; j < vt; ++j) {
              sep += exp_acc(zp[j] - shift_p);
              const T er = exp_acc(zr[j] - shift_r);
              ser += er;
              // both logits shifted by their max (no cancellation); masked in the reference: adds 0
              sc += er > T(0) ? er * ((zr[j] - shift_r) - (zp[j] - shift_p)) : T(0);
            }
            // the old sum moved to the new maxima: cross + ((m_r - M_r) - (m_p - M_p)) s_r (expo_kernels.ops.state)
            const T moved = ((sr[i] > T(0) ? mr[i] - shift_r : T(0)) - (sp[i] > T(0) ? mp[i] - shift_p : T(0))) * sr[i];
            cross[i] = resc_r * (cross[i] + moved) + sc;
            sp[i] = sp[i] * resc_p + sep;
            sr[i] = sr[i] * resc_r + ser;
            mp[i] = mp_new;
            mr[i] = mr_new;
          }
        });
      }
    }
  }
  // the raw partial state, in the field order of expo_kernels.ops.state.TokenKLState
  return {mp_t, sp_t, mr_t, sr_t, cross_t};
}

std::vector<Tensor> kl_forward(const Tensor& hidden, const Tensor& weight, const c10::optional<Tensor>& bias,
                               const Tensor& ref_hidden, const Tensor& ref_weight, const c10::optional<Tensor>& ref_bias,
                               double scale, c10::optional<double> softcap, double inv_temp, int64_t token_block,
                               int64_t vocab_tile) {
  check_inputs(hidden, weight, bias);
  check_inputs(ref_hidden, ref_weight, ref_bias);
  TORCH_CHECK(ref_hidden.size(0) == hidden.size(0) && ref_weight.size(0) == weight.size(0),
              "expo_native: policy and reference shapes disagree");
  if (hidden.scalar_type() == at::kDouble) {
    return kl_forward_impl<double>(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, scale, softcap, inv_temp,
                                   token_block, vocab_tile);
  }
  return kl_forward_impl<float>(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, scale, softcap, inv_temp,
                                token_block, vocab_tile);
}

template <typename T>
std::vector<Tensor> kl_backward_impl(const Tensor& grad_in, const Tensor& hidden_in, const Tensor& weight_in,
                                     const c10::optional<Tensor>& bias_in, const Tensor& ref_hidden_in,
                                     const Tensor& ref_weight_in, const c10::optional<Tensor>& ref_bias_in,
                                     const Tensor& lse_p_in, const Tensor& lse_r_in, double scale,
                                     c10::optional<double> softcap, double inv_temp, bool need_h, bool need_w,
                                     bool need_b, int64_t token_block, int64_t vocab_tile) {
  const at::ScalarType acc = acc_type<T>();
  const bool has_b = bias_in.has_value() && bias_in->defined();
  const bool has_rb = ref_bias_in.has_value() && ref_bias_in->defined();
  need_b = need_b && has_b;
  const int64_t Hr = ref_weight_in.size(1);
  Tensor hidden = to_acc(hidden_in, acc), ref_hidden = to_acc(ref_hidden_in, acc);
  Tensor weight = weight_in.contiguous(), ref_weight = ref_weight_in.contiguous();
  Tensor bias = bias_or_zeros(bias_in, weight_in.size(0), hidden.options());
  Tensor ref_bias = bias_or_zeros(ref_bias_in, weight_in.size(0), hidden.options());
  Tensor g_t = to_acc(grad_in, acc), lp_t = to_acc(lse_p_in, acc), lr_t = to_acc(lse_r_in, acc);
  const Transform<T> tf(scale, softcap, inv_temp);
  const T* g = g_t.data_ptr<T>();
  const T* lp = lp_t.data_ptr<T>();
  const T* lr = lr_t.data_ptr<T>();
  const T* bp = bias.data_ptr<T>();
  const T* brp = ref_bias.data_ptr<T>();
  const int64_t vt_max_all = std::max<int64_t>(1, std::min<int64_t>(weight.size(0), vocab_tile));
  Tensor rwbuf = ref_weight.scalar_type() == acc ? Tensor() : at::empty({vt_max_all * Hr}, hidden.options());

  // The reference logits of the block go to the extra tile before the row loop.
  auto prep = [&](int64_t v0, int64_t vt, int64_t t0, int64_t nb, std::vector<Tensor>& extra) {
    Tensor rw = weight_tile(ref_weight, v0, vt, acc, rwbuf);
    at::mm_out(extra[0], ref_hidden.narrow(0, t0, nb), rw.t());
  };
  auto row_fn = [&](T* z, const std::vector<T*>& extra, int64_t r, int64_t i, int64_t v0, int64_t vt) {
    T* zr = extra[0] + r * vt;
    apply_transform_row<T>(zr, brp + v0, vt, tf, has_rb);
    const T gi = g[i], lpi = lp[i], lri = lr[i];
    const T* b = bp + v0;
    if (!tf.has_softcap) {
      const T mul = tf.scale * tf.inv_temp;
      const T coef = gi * mul;
#pragma omp simd
      for (int64_t j = 0; j < vt; ++j) {
        const T zp = (z[j] + b[j]) * mul;
        z[j] = coef * (prob(zp, lpi) - prob(zr[j], lri));
      }
    } else {
      const T pre = tf.scale / tf.softcap, post = tf.softcap * tf.inv_temp, dmul = gi * tf.scale * tf.inv_temp;
      const T* zrc = zr;
#pragma omp simd
      for (int64_t j = 0; j < vt; ++j) {
        const T t = tanh_acc((z[j] + b[j]) * pre);
        const T p = prob(post * t, lpi);
        const T q = prob(zrc[j], lri);
        z[j] = (p - q) * (dmul * (T(1) - t * t));
      }
    }
  };
  GradOut o = backward_driver<T>(hidden, weight, has_b ? *bias_in : Tensor(), need_h, need_w, need_b,
                                 token_block, vocab_tile, 1, prep, row_fn);
  if (o.d_hidden.defined()) o.d_hidden = o.d_hidden.to(hidden_in.scalar_type());
  return {o.d_hidden.defined() ? o.d_hidden : at::empty({0}, hidden_in.options()),
          o.d_weight.defined() ? o.d_weight : at::empty({0}, weight_in.options()),
          o.d_bias.defined() ? o.d_bias : at::empty({0}, weight_in.options())};
}

std::vector<Tensor> kl_backward(const Tensor& grad, const Tensor& hidden, const Tensor& weight,
                                const c10::optional<Tensor>& bias, const Tensor& ref_hidden, const Tensor& ref_weight,
                                const c10::optional<Tensor>& ref_bias, const Tensor& lse_p, const Tensor& lse_r,
                                double scale, c10::optional<double> softcap, double inv_temp, bool need_h,
                                bool need_w, bool need_b, int64_t token_block, int64_t vocab_tile) {
  check_inputs(hidden, weight, bias);
  check_inputs(ref_hidden, ref_weight, ref_bias);
  if (hidden.scalar_type() == at::kDouble) {
    return kl_backward_impl<double>(grad, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse_p, lse_r, scale,
                                    softcap, inv_temp, need_h, need_w, need_b, token_block, vocab_tile);
  }
  return kl_backward_impl<float>(grad, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse_p, lse_r, scale,
                                 softcap, inv_temp, need_h, need_w, need_b, token_block, vocab_tile);
}

// ------------------------------------------------------------------------------------------
// Engine epilogues (expo_kernels/engine.py): the logits of a chunk already sit in a bounded
// workspace [n, V] (written by a library GEMM); one pass folds them, one turns them into dz in place.
// ------------------------------------------------------------------------------------------

void check_workspace(const Tensor& z, const Tensor& labels) {
  TORCH_CHECK(z.device().is_cpu() && z.dim() == 2 && z.is_contiguous(), "expo_native: contiguous CPU [n, V] logits");
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble, "expo_native: float32/64 logits");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == z.size(0), "expo_native: labels [n] expected");
}

template <typename T>
std::vector<Tensor> fold_logits_impl(const Tensor& z, const c10::optional<Tensor>& bias_in, const Tensor& labels_in,
                                     int64_t vocab_start, double scale, c10::optional<double> softcap,
                                     double inv_temp, bool with_stats) {
  const int64_t N = z.size(0), V = z.size(1);
  auto opts = z.options();
  Tensor labels = labels_in.to(at::kLong).contiguous();
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  Tensor bias = bias_or_zeros(bias_in, V, opts);
  const Transform<T> tf(scale, softcap, inv_temp);
  std::vector<Tensor> state = empty_state<T>(N, opts, with_stats);
  if (N > 0 && V > 0) {
    const RowState<T> st = row_state<T>(state);
    const int64_t* y = labels.data_ptr<int64_t>();
    const T* bptr = bias.data_ptr<T>();
    T* base = z.data_ptr<T>();
    at::parallel_for(0, N, row_grain(V), [&](int64_t r_begin, int64_t r_end) {
      for (int64_t r = r_begin; r < r_end; ++r) fold_row<T>(base + r * V, bptr, V, tf, has_bias, y[r] - vocab_start, st, r);
    });
  }
  return state;
}

// Raw logits of a workspace [n, V] -> bias + transform in place, and the partial state of each row.
std::vector<Tensor> fold_logits_(Tensor z, const c10::optional<Tensor>& bias, const Tensor& labels, int64_t vocab_start,
                                 double scale, c10::optional<double> softcap, double inv_temp, bool with_stats) {
  check_workspace(z, labels);
  if (z.scalar_type() == at::kDouble) {
    return fold_logits_impl<double>(z, bias, labels, vocab_start, scale, softcap, inv_temp, with_stats);
  }
  return fold_logits_impl<float>(z, bias, labels, vocab_start, scale, softcap, inv_temp, with_stats);
}

template <typename T>
void logits_to_dz_impl(const Tensor& z, const Tensor& labels_in, int64_t vocab_start, const Tensor& lse_in,
                       const Tensor& g_in, double scale, c10::optional<double> softcap, double inv_temp) {
  const int64_t N = z.size(0), V = z.size(1);
  if (N == 0 || V == 0) return;
  Tensor labels = labels_in.to(at::kLong).contiguous();
  Tensor lse_t = to_acc(lse_in, acc_type<T>()), g_t = to_acc(g_in, acc_type<T>());
  const Transform<T> tf(scale, softcap, inv_temp);
  const int64_t* y = labels.data_ptr<int64_t>();
  const T* lse = lse_t.data_ptr<T>();
  const T* g = g_t.data_ptr<T>();
  T* base = z.data_ptr<T>();
  at::parallel_for(0, N, row_grain(V), [&](int64_t r_begin, int64_t r_end) {
    for (int64_t r = r_begin; r < r_end; ++r) {
      T* zr = base + r * V;
      const T gi = g[r], li = lse[r];
      const int64_t yl = y[r] - vocab_start;
      const bool label_here = yl >= 0 && yl < V;
      const T dmul = tf.scale * tf.inv_temp;
      if (!tf.has_softcap) {
        const T coef = -gi * dmul;
#pragma omp simd
        for (int64_t j = 0; j < V; ++j) zr[j] = coef * prob(zr[j], li);
        if (label_here) zr[yl] += gi * dmul;
      } else {
        // dz/draw from the transformed logit: z = c t / T with t = tanh(raw s / c), dz/draw = s / T (1 - t^2)
        const T post = tf.softcap * tf.inv_temp;
        const T t_label = label_here ? zr[yl] / post : T(0);
#pragma omp simd
        for (int64_t j = 0; j < V; ++j) {
          const T t = zr[j] / post;
          zr[j] = -gi * prob(zr[j], li) * (dmul * (T(1) - t * t));
        }
        if (label_here) zr[yl] += gi * dmul * (T(1) - t_label * t_label);
      }
    }
  });
}

// Transformed logits of a workspace [n, V] -> dz = g (onehot - p) dz/draw, in place.
void logits_to_dz_(Tensor z, const Tensor& labels, int64_t vocab_start, const Tensor& lse, const Tensor& g,
                   double scale, c10::optional<double> softcap, double inv_temp) {
  check_workspace(z, labels);
  if (z.scalar_type() == at::kDouble) {
    logits_to_dz_impl<double>(z, labels, vocab_start, lse, g, scale, softcap, inv_temp);
  } else {
    logits_to_dz_impl<float>(z, labels, vocab_start, lse, g, scale, softcap, inv_temp);
  }
}

}  // namespace
}  // namespace expo_native

// Schemas here, the kernels under the CPU key (TORCH_LIBRARY_IMPL below): a kernel registered with the
// schema would be CompositeImplicitAutograd, which tracing (torch.compile's fake tensors) decomposes by
// calling it on tensors without data; as CPU kernels, the Python fake implementations
// (expo_kernels/ops/_native_build.py, register_fakes) describe their outputs instead.
TORCH_LIBRARY(expo_native, m) {
  m.def("logprobs_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, float scale, float? softcap, "
        "float inv_temp, bool with_stats, int vocab_start, int token_block, int vocab_tile, int topk=0) -> Tensor[]");
  m.def("logprobs_backward(Tensor grad, Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor lse, "
        "float scale, float? softcap, float inv_temp, bool need_hidden, bool need_weight, bool need_bias, "
        "int vocab_start, int token_block, int vocab_tile) -> Tensor[]");
  m.def("token_kl_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor ref_hidden, Tensor ref_weight, "
        "Tensor? ref_bias, float scale, float? softcap, float inv_temp, int token_block, int vocab_tile) -> Tensor[]");
  m.def("fold_logits_(Tensor(a!) z, Tensor? bias, Tensor labels, int vocab_start, float scale, float? softcap, "
        "float inv_temp, bool with_stats) -> Tensor[]");
  m.def("logits_to_dz_(Tensor(a!) z, Tensor labels, int vocab_start, Tensor lse, Tensor g, float scale, "
        "float? softcap, float inv_temp) -> ()");
  m.def("token_kl_backward(Tensor grad, Tensor hidden, Tensor weight, Tensor? bias, Tensor ref_hidden, "
        "Tensor ref_weight, Tensor? ref_bias, Tensor lse_p, Tensor lse_r, float scale, float? softcap, "
        "float inv_temp, bool need_hidden, bool need_weight, bool need_bias, int token_block, int vocab_tile) "
        "-> Tensor[]");
}

TORCH_LIBRARY_IMPL(expo_native, CPU, m) {
  m.impl("logprobs_forward", &expo_native::logprobs_forward);
  m.impl("logprobs_backward", &expo_native::logprobs_backward);
  m.impl("token_kl_forward", &expo_native::kl_forward);
  m.impl("fold_logits_", &expo_native::fold_logits_);
  m.impl("logits_to_dz_", &expo_native::logits_to_dz_);
  m.impl("token_kl_backward", &expo_native::kl_backward);
}
