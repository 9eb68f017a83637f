// Ladle's CPU kernels. First: decode attention over a paged KV cache.
//
// One query token per request. K and V are read where they lie in the cache, block by block
// through the request's block table: no gathered copy. Work is split over (request, KV head)
// pairs; the query heads that share a KV head (grouped-query attention) are served by one pass
// over its keys and values.
//
// Shapes:
//   q            [B, Hq, D]            float32 / bfloat16 / float16
//   k_cache      [Hkv, NB, BS, D]      same dtype as q
//   v_cache      [Hkv, NB, BS, D]
//   block_tables [B, max_blocks]       int64
//   context_lens [B]                   int64 (tokens to attend to, the new one included)
//   returns      [B, Hq, D]            same dtype as q
//
// With D = 64 or 128 the kernel uses 8-wide float32 vectors (GCC/Clang vector extensions, so it
// compiles for any target; a bf16/fp16 block is converted to float32 first): four keys at a time,
// so that four independent accumulator chains hide the latency of the fused multiply-adds. Other
// head sizes take the scalar path.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

typedef float v8 __attribute__((vector_size(32)));

inline v8 load8(const float* p) {
  v8 r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
inline void store8(float* p, v8 x) { std::memcpy(p, &x, sizeof(x)); }
inline float hsum(v8 x) {
  const v8 a = x + __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3);
  const v8 b = a + __builtin_shufflevector(a, a, 2, 3, 0, 1, 6, 7, 4, 5);
  const v8 c = b + __builtin_shufflevector(b, b, 1, 0, 3, 2, 5, 4, 7, 6);
  return c[0];
}

// The four sums of a0..a3 into out[0..3] with one reduction tree (9 shuffles, 7 adds, against 24
// for four hsum calls).
inline void hsum4(v8 a0, v8 a1, v8 a2, v8 a3, float* out) {
  const v8 p01 = __builtin_shufflevector(a0, a1, 0, 1, 2, 3, 8, 9, 10, 11) +
                 __builtin_shufflevector(a0, a1, 4, 5, 6, 7, 12, 13, 14, 15);
  const v8 p23 = __builtin_shufflevector(a2, a3, 0, 1, 2, 3, 8, 9, 10, 11) +
                 __builtin_shufflevector(a2, a3, 4, 5, 6, 7, 12, 13, 14, 15);
  const v8 q = __builtin_shufflevector(p01, p23, 0, 1, 4, 5, 8, 9, 12, 13) +
               __builtin_shufflevector(p01, p23, 2, 3, 6, 7, 10, 11, 14, 15);
  const v8 r = __builtin_shufflevector(q, q, 0, 2, 4, 6, 0, 2, 4, 6) + __builtin_shufflevector(q, q, 1, 3, 5, 7, 1, 3, 5, 7);
  out[0] = r[0];
  out[1] = r[1];
  out[2] = r[2];
  out[3] = r[3];
}

// Conversions between the storage dtype and float32. bfloat16 is done on the bits (a shift one
// way, round-to-nearest-even the other, as c10 does) so that loops over rows vectorize: c10's own
// conversion is an opaque call per element, ten times slower in the silu and attention loops.
template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }
template <>
inline float to_float<c10::BFloat16>(c10::BFloat16 x) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(x.x) << 16);
}

template <typename T>
inline T from_float(float f) { return static_cast<T>(f); }
template <>
inline c10::BFloat16 from_float<c10::BFloat16>(float f) {
  const uint32_t u = __builtin_bit_cast(uint32_t, f);
  const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return c10::BFloat16(f != f ? static_cast<uint16_t>(0x7FC0) : rounded, c10::BFloat16::from_bits());
}

// x rounded to the storage dtype and back (the reference rounds some intermediates)
template <typename T>
inline float round_to(float f) { return to_float<T>(from_float<T>(f)); }

template <typename T>
inline void row_to_float(const T* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float<T>(src[i]);
}

// e^x with a relative error below 2e-7 (Cody-Waite reduction, Cephes' polynomial), written so
// that `omp simd` loops vectorize it: libm's expf is a scalar call.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.f), 88.f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

// softmax over len scores in place; scores are already scaled
inline void softmax_inplace(float* s, int64_t len) {
  float m = -std::numeric_limits<float>::max();
  for (int64_t t = 0; t < len; ++t) m = std::max(m, s[t]);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < len; ++t) {
    s[t] = fast_exp(s[t] - m);
    sum += s[t];
  }
  const float inv = 1.f / sum;
#pragma omp simd
  for (int64_t t = 0; t < len; ++t) s[t] *= inv;
}

// ---- generic path (any dtype, any head size) -------------------------------------------------

template <typename T>
void decode_item_generic(const T* q, const T* k_cache, const T* v_cache, const int64_t* table, int64_t len,
                         T* out, int64_t G, int64_t NB, int64_t BS, int64_t D, int64_t h, float scale,
                         std::vector<float>& qf, std::vector<float>& acc, std::vector<float>& scores) {
  for (int64_t i = 0; i < G * D; ++i) qf[i] = to_float(q[i]) * scale;
  scores.resize(G * len);
  for (int64_t t = 0; t < len; ++t) {
    const T* k = k_cache + ((h * NB + table[t / BS]) * BS + t % BS) * D;
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = qf.data() + g * D;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < D; ++d) s += qg[d] * to_float(k[d]);
      scores[g * len + t] = s;
    }
  }
  for (int64_t g = 0; g < G; ++g) softmax_inplace(scores.data() + g * len, len);
  std::fill(acc.begin(), acc.end(), 0.f);
  for (int64_t t = 0; t < len; ++t) {
    const T* v = v_cache + ((h * NB + table[t / BS]) * BS + t % BS) * D;
    for (int64_t g = 0; g < G; ++g) {
      const float p = scores[g * len + t];
      float* ag = acc.data() + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) ag[d] += p * to_float(v[d]);
    }
  }
  for (int64_t i = 0; i < G * D; ++i) out[i] = from_float<T>(acc[i]);
}

// ---- head size 64 or 128, any dtype computed in float32 (W = D / 8 vectors a row) ---------------

// A block of the cache as float32: in place for a float32 cache, else converted into buf.
template <typename T>
inline const float* block_as_float(const T* block, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return block;
  } else {
    row_to_float<T>(block, buf, n);
    return buf;
  }
}

template <typename T, int W>
void decode_item_vec(const T* q, const T* k_cache, const T* v_cache, const int64_t* table, int64_t len,
                     T* out, int64_t G, int64_t NB, int64_t BS, int64_t h, float scale,
                     std::vector<float>& qf, std::vector<float>& acc, std::vector<float>& scores,
                     std::vector<float>& buf) {
  constexpr int64_t D = 8 * W;
  for (int64_t i = 0; i < G * D; ++i) qf[i] = to_float<T>(q[i]) * scale;
  scores.resize(G * len);
  // scores: for each query head, four keys at a time
  for (int64_t start = 0; start < len; start += BS) {
    const int64_t n = std::min(BS, len - start);
    const float* kb = block_as_float<T>(k_cache + (h * NB + table[start / BS]) * BS * D, n * D, buf.data());
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = qf.data() + g * D;
      float* sg = scores.data() + g * len + start;
      int64_t t = 0;
      for (; t + 4 <= n; t += 4) {
        v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        const float* k0 = kb + t * D;
#pragma GCC unroll 16
        for (int w = 0; w < W; ++w) {
          const v8 qv = load8(qg + 8 * w);
          a0 += qv * load8(k0 + 8 * w);
          a1 += qv * load8(k0 + D + 8 * w);
          a2 += qv * load8(k0 + 2 * D + 8 * w);
          a3 += qv * load8(k0 + 3 * D + 8 * w);
        }
        hsum4(a0, a1, a2, a3, sg + t);
      }
      for (; t < n; ++t) {
        v8 a = {0};
#pragma GCC unroll 16
        for (int w = 0; w < W; ++w) a += load8(qg + 8 * w) * load8(kb + t * D + 8 * w);
        sg[t] = hsum(a);
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) softmax_inplace(scores.data() + g * len, len);
  // out: per query head, the weighted sum of values, the accumulator held across a block
  std::fill(acc.begin(), acc.end(), 0.f);
  for (int64_t start = 0; start < len; start += BS) {
    const int64_t n = std::min(BS, len - start);
    const float* vb = block_as_float<T>(v_cache + (h * NB + table[start / BS]) * BS * D, n * D, buf.data());
    for (int64_t g = 0; g < G; ++g) {
      const float* pg = scores.data() + g * len + start;
      float* ag = acc.data() + g * D;
      for (int w0 = 0; w0 < W; w0 += 8) {  // eight vectors of the row stay in registers over the block
        v8 r[8];
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) r[j] = load8(ag + 8 * (w0 + j));
        for (int64_t t = 0; t < n; ++t) {
          const v8 p = {pg[t], pg[t], pg[t], pg[t], pg[t], pg[t], pg[t], pg[t]};
          const float* vr = vb + t * D + 8 * w0;
#pragma GCC unroll 8
          for (int j = 0; j < 8; ++j) r[j] += p * load8(vr + 8 * j);
        }
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) store8(ag + 8 * (w0 + j), r[j]);
      }
    }
  }
  for (int64_t i = 0; i < G * D; ++i) out[i] = from_float<T>(acc[i]);
}

#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512DQ__)
// bfloat16 cache, head size 64 or 128, on CPUs with AVX512-BF16: q . k straight from the cache
// with vdpbf16ps (32 products per instruction, exact in float32, no conversion pass over the
// keys), the scale applied to the score; values converted once per block and summed 16 wide. On
// a 2-core AVX-512 EPYC, 32 requests x 320 tokens of context, one layer: 589 -> 446 us (medians of
// 15 interleaved rounds against the 8-wide float path).
template <int D>
void decode_item_bf16(const c10::BFloat16* q, const c10::BFloat16* k_cache, const c10::BFloat16* v_cache,
                      const int64_t* table, int64_t len, c10::BFloat16* out, int64_t G, int64_t NB, int64_t BS,
                      int64_t h, float scale, std::vector<float>& acc, std::vector<float>& scores,
                      std::vector<float>& buf) {
  constexpr int P = D / 32;  // 512-bit bf16 vectors per row
  constexpr int W = D / 16;  // 512-bit float vectors per row
  scores.resize(G * len);
  for (int64_t g = 0; g < G; ++g) {
    __m512bh qv[P];
    for (int p = 0; p < P; ++p) qv[p] = (__m512bh)_mm512_loadu_si512(q + g * D + 32 * p);
    float* sg = scores.data() + g * len;
    for (int64_t start = 0; start < len; start += BS) {
      const int64_t n = std::min(BS, len - start);
      const c10::BFloat16* kb = k_cache + (h * NB + table[start / BS]) * BS * D;
      int64_t t = 0;
      for (; t + 4 <= n; t += 4) {
        __m512 a[4];
        for (int j = 0; j < 4; ++j) {
          a[j] = _mm512_setzero_ps();
#pragma GCC unroll 4
          for (int p = 0; p < P; ++p)
            a[j] = _mm512_dpbf16_ps(a[j], qv[p], (__m512bh)_mm512_loadu_si512(kb + (t + j) * D + 32 * p));
        }
        v8 f[4];
        for (int j = 0; j < 4; ++j) {
          const __m256 lo = _mm512_castps512_ps256(a[j]), hi = _mm512_extractf32x8_ps(a[j], 1);
          f[j] = (v8)_mm256_add_ps(lo, hi);
        }
        hsum4(f[0], f[1], f[2], f[3], sg + start + t);
        for (int j = 0; j < 4; ++j) sg[start + t + j] *= scale;
      }
      for (; t < n; ++t) {
        __m512 a = _mm512_setzero_ps();
        for (int p = 0; p < P; ++p)
          a = _mm512_dpbf16_ps(a, qv[p], (__m512bh)_mm512_loadu_si512(kb + t * D + 32 * p));
        sg[start + t] = _mm512_reduce_add_ps(a) * scale;
      }
    }
    softmax_inplace(sg, len);
  }
  std::fill(acc.begin(), acc.end(), 0.f);
  for (int64_t start = 0; start < len; start += BS) {
    const int64_t n = std::min(BS, len - start);
    const float* vb = block_as_float<c10::BFloat16>(v_cache + (h * NB + table[start / BS]) * BS * D, n * D, buf.data());
    for (int64_t g = 0; g < G; ++g) {
      const float* pg = scores.data() + g * len + start;
      float* ag = acc.data() + g * D;
      __m512 r[W];
      for (int j = 0; j < W; ++j) r[j] = _mm512_loadu_ps(ag + 16 * j);
      for (int64_t t = 0; t < n; ++t) {
        const __m512 pv = _mm512_set1_ps(pg[t]);
#pragma GCC unroll 8
        for (int j = 0; j < W; ++j) r[j] = _mm512_fmadd_ps(pv, _mm512_loadu_ps(vb + t * D + 16 * j), r[j]);
      }
      for (int j = 0; j < W; ++j) _mm512_storeu_ps(ag + 16 * j, r[j]);
    }
  }
  for (int64_t i = 0; i < G * D; ++i) out[i] = from_float<c10::BFloat16>(acc[i]);
}
#endif

// Items handed out one at a time from a shared counter: on a shared host one vCPU often runs
// slower than the other for a while, and a split fixed up front leaves the fast thread waiting at
// the barrier (9.6% of c32's thread time at the end of w8a8 layers on a 2-core EPYC). Items go out
// in index order; each is computed the same whoever takes it, so the results do not depend on the
// threads.
template <typename Work>
void parallel_items(int64_t count, const Work& work) {
  const int64_t threads = std::max(1, at::get_num_threads());
  if (count <= threads) {  // an item per thread: nothing to balance, and a thread woken late must not
    at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {  // see the early one take its item
      for (int64_t item = begin; item < end; ++item) work(item);
    });
    return;
  }
  struct alignas(64) Counter {  // a line of its own, away from the locals the workers read
    std::atomic<int64_t> value{0};
    char pad[64 - sizeof(std::atomic<int64_t>)];
  } next;
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t item = next.value.fetch_add(1); item < count; item = next.value.fetch_add(1)) work(item);
  });
}

template <typename T>
void decode_kernel(const T* q, const T* k_cache, const T* v_cache, const int64_t* block_tables,
                   const int64_t* context_lens, T* out, int64_t B, int64_t Hq, int64_t Hkv, int64_t NB,
                   int64_t BS, int64_t D, int64_t max_blocks, float scale) {
  const int64_t G = Hq / Hkv;
  // Items split into one contiguous range per thread of about equal cost (the context lengths
  // differ; an even split of items left one thread waiting at the end of most steps).
  const int64_t items = B * Hkv;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  std::vector<int64_t> cut(parts + 1, items);
  cut[0] = 0;
  {
    int64_t total = 0;
    for (int64_t b = 0; b < B; ++b) total += (context_lens[b] + 16) * Hkv;
    int64_t run = 0, p = 1;
    for (int64_t item = 0; item < items && p < parts; ++item) {
      run += context_lens[item / Hkv] + 16;
      if (run * parts >= total * p) cut[p++] = item + 1;
    }
  }
  at::parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
    std::vector<float> qf(G * D), acc(G * D), scores, buf(BS * D);
    for (int64_t item = cut[part_begin]; item < cut[part_end]; ++item) {
      const int64_t b = item / Hkv, h = item % Hkv;
      const int64_t offset = (b * Hq + h * G) * D;  // this KV head's query heads, contiguous
      const int64_t* table = block_tables + b * max_blocks;
#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512DQ__)
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (D == 64 || D == 128) {
          auto item_fn = D == 64 ? decode_item_bf16<64> : decode_item_bf16<128>;
          item_fn(q + offset, k_cache, v_cache, table, context_lens[b], out + offset, G, NB, BS, h, scale, acc,
                  scores, buf);
          continue;
        }
      }
#endif
      if (D == 64 || D == 128) {
        auto item_fn = D == 64 ? decode_item_vec<T, 8> : decode_item_vec<T, 16>;
        item_fn(q + offset, k_cache, v_cache, table, context_lens[b], out + offset, G, NB, BS, h, scale, qf, acc,
                scores, buf);
        continue;
      }
      decode_item_generic<T>(q + offset, k_cache, v_cache, table, context_lens[b], out + offset, G, NB, BS, D, h,
                             scale, qf, acc, scores);
    }
  });
}

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q must be [B, Hq, D] and the cache [Hkv, NB, BS, D]");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous tensors only");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "block tables and context lengths must be int64");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q and the cache must have one dtype");
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Hkv = k_cache.size(0), NB = k_cache.size(1), BS = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && Hq % Hkv == 0, "head shapes do not match");
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    decode_kernel<scalar_t>(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                            tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), B, Hq,
                            Hkv, NB, BS, D, tables.size(1), static_cast<float>(scale));
  });
  return out;
}

// The step's new keys and values into their cache slots: k, v [T, Hkv, D] (any strides with a
// contiguous last dimension), slot s of head h at cache[h][s] of the [Hkv, NB * BS, D] view. One
// call for both caches: the two index_copy_ it replaces cost ~7 us each per layer at one token.
void write_kv_slots(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor k, torch::Tensor v,
                    torch::Tensor slots) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous caches");
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k.stride(2) == 1 && v.stride(2) == 1, "k, v [T, Hkv, D]");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == v_cache.scalar_type(), "one dtype");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == k.size(0), "slots int64 [T]");
  const int64_t T = k.size(0), Hkv = k.size(1), D = k.size(2);
  const int64_t slots_per_head = k_cache.size(1) * k_cache.size(2);
  TORCH_CHECK(k_cache.size(0) == Hkv && k_cache.size(3) == D, "cache shape does not match k");
  auto sl = slots.contiguous();
  const int64_t* sp = sl.data_ptr<int64_t>();
  const int64_t es = k.element_size(), bytes = D * es;
  auto* kc = static_cast<char*>(k_cache.data_ptr());
  auto* vc = static_cast<char*>(v_cache.data_ptr());
  const auto* kp = static_cast<const char*>(k.data_ptr());
  const auto* vp = static_cast<const char*>(v.data_ptr());
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(sp[t] >= 0 && sp[t] < slots_per_head, "slot out of range");
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < Hkv; ++h) {
      const int64_t dst = (h * slots_per_head + sp[t]) * bytes;
      std::memcpy(kc + dst, kp + (t * k.stride(0) + h * k.stride(1)) * es, bytes);
      std::memcpy(vc + dst, vp + (t * v.stride(0) + h * v.stride(1)) * es, bytes);
    }
  }
}

// ---- fused elementwise ops of a decoder layer ----------------------------------------------------
//
// Each replaces several PyTorch ops (and their passes over memory) by one pass per row, rows split
// over threads. All math in float32 whatever the storage dtype, as the reference does.

template <typename T>
void rms_row(const T* x, const T* w, T* out, int64_t H, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < H; ++i) {
    const float v = to_float<T>(x[i]);
    ss += v * v;
  }
  const float inv = 1.f / std::sqrt(ss / H + eps);
#pragma omp simd
  for (int64_t i = 0; i < H; ++i) out[i] = from_float<T>(to_float<T>(w[i]) * round_to<T>(to_float<T>(x[i]) * inv));
}

// out = rms_norm(x) * w
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.dim() == 2, "rms_norm takes a contiguous [T, H] tensor");
  auto out = torch::empty_like(x);
  const int64_t T = x.size(0), H = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) rms_row<scalar_t>(xp + t * H, wp, op + t * H, H, static_cast<float>(eps));
    });
  });
  return out;
}

// residual += x (in place); returns rms_norm(residual) * w
torch::Tensor add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor w, double eps) {
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && x.sizes() == residual.sizes(),
              "add_rms_norm takes two contiguous tensors of one shape");
  auto out = torch::empty_like(x);
  const int64_t T = x.size(0), H = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* rp = residual.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        scalar_t* r = rp + t * H;
        const scalar_t* xr = xp + t * H;
        _Pragma("omp simd")
        for (int64_t i = 0; i < H; ++i) r[i] = from_float<scalar_t>(to_float<scalar_t>(r[i]) + to_float<scalar_t>(xr[i]));
        rms_row<scalar_t>(r, wp, op + t * H, H, static_cast<float>(eps));
      }
    });
  });
  return out;
}

// Rotate q and k in place (rotate-half layout) inside the fused qkv projection output [T, Q + 2 KV].
void rotary_inplace(torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos_sin, int64_t num_heads,
                    int64_t num_kv_heads, int64_t head_dim) {
  TORCH_CHECK(qkv.is_contiguous() && cos_sin.is_contiguous() && cos_sin.scalar_type() == at::kFloat,
              "rotary takes the contiguous qkv output and a float32 cos/sin table");
  auto pos = positions.contiguous();
  const int64_t T = qkv.size(0), row = qkv.size(1), half = head_dim / 2;
  const int64_t rotated_heads = num_heads + num_kv_heads;  // q heads then k heads, adjacent in the row
  TORCH_CHECK(row >= rotated_heads * head_dim, "qkv row too short");
  const float* table = cos_sin.data_ptr<float>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rotary", [&] {
    scalar_t* base = qkv.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const float* cs = table + pp[t] * head_dim;  // [cos (half) | sin (half)]
        for (int64_t h = 0; h < rotated_heads; ++h) {
          scalar_t* x = base + t * row + h * head_dim;
          for (int64_t i = 0; i < half; ++i) {
            const float x1 = to_float<scalar_t>(x[i]), x2 = to_float<scalar_t>(x[i + half]);
            const float c = cs[i], s = cs[half + i];
            x[i] = from_float<scalar_t>(x1 * c - x2 * s);
            x[i + half] = from_float<scalar_t>(x2 * c + x1 * s);
          }
        }
      }
    });
  });
}

// silu(gate) * up for the fused [T, 2I] gate/up projection output
torch::Tensor silu_and_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.is_contiguous() && gate_up.dim() == 2, "silu_and_mul takes a contiguous [T, 2I] tensor");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  auto out = torch::empty({T, I}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* g = gate_up.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 8, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const scalar_t* gr = g + t * 2 * I;
        scalar_t* orow = o + t * I;
        _Pragma("omp simd")  // a #pragma cannot stand inside the dispatch macro's argument
        for (int64_t i = 0; i < I; ++i) {
          const float a = to_float<scalar_t>(gr[i]);
          orow[i] = from_float<scalar_t>(round_to<scalar_t>(a / (1.f + fast_exp(-a))) * to_float<scalar_t>(gr[I + i]));
        }
      }
    });
  });
  return out;
}

// ---- int8 weight-only matrix product for few rows (decode) --------------------------------------
//
// y[m, n] = scale[n] * sum_k x[m, k] * w[n, k], w int8 [N, K], x [M, K] in the activations' dtype
// (converted to float32 once). Decoding is bound by reading the weights: each weight row is read
// once for up to eight rows of x, converted 8 int8 at a time to float32 and multiplied into one
// accumulator vector per x row, several weight rows per pass so the x loads are shared (as many as
// the 16 AVX2 registers allow). Output channels are split over threads. Every (m, n) is summed the
// same way whatever M, the pass width or the thread split: a row's result is the same alone and
// in a batch (the identity of batched and speculative decoding relies on it).
//
// With AVX2 and FMA the conversion uses vpmovsxbd/vcvtdq2ps intrinsics (3x faster than GCC's
// generic vector conversion, measured: 30 layers of SmolLM2-135M at 1 row 29.2 → 9.7 ms, against
// 52.4 ms for PyTorch's _weight_int8pack_mm on a 2-core AVX2 EPYC); elsewhere generic vectors.
// Prefetching the next pass's rows: 12.7 → 8.9 ms (medians of noisy runs on that machine).

#if defined(__AVX2__) && defined(__FMA__)
typedef __m256 acc_t;
inline acc_t acc_zero() { return _mm256_setzero_ps(); }
inline acc_t load_w8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline acc_t load_x8(const float* p) { return _mm256_loadu_ps(p); }
inline acc_t fma8(acc_t a, acc_t b, acc_t c) { return _mm256_fmadd_ps(a, b, c); }
inline float sum8(acc_t v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(_mm_hadd_ps(lo, lo));
}
#else
typedef int8_t i8x8 __attribute__((vector_size(8)));
typedef v8 acc_t;
inline acc_t acc_zero() { return v8{0}; }
inline acc_t load_w8(const int8_t* p) {
  i8x8 r;
  std::memcpy(&r, p, sizeof(r));
  return __builtin_convertvector(r, v8);
}
inline acc_t load_x8(const float* p) { return load8(p); }
inline acc_t fma8(acc_t a, acc_t b, acc_t c) { return a * b + c; }
inline float sum8(acc_t v) { return hsum(v); }
#endif

// R weight rows by M x rows per pass; rows left over go one at a time (same sums, R = 1).
template <int M, int R>
void int8_rows(const float* x, const int8_t* w, const float* scales, float* y, int64_t n_begin, int64_t n_end,
               int64_t K, int64_t N) {
  const int64_t K8 = K / 8 * 8;
  int64_t n = n_begin;
  for (; n + R <= n_end; n += R) {
    acc_t acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = acc_zero();
    const int8_t* next = w + (n + R) * K;  // the next pass's rows, fetched while this one computes
    for (int64_t k = 0; k < K8; k += 8) {
      if ((k & 15) == 0) __builtin_prefetch(next + k * R);  // one 64-byte line per 16 k for R = 4
      acc_t b[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) b[r] = load_w8(w + (n + r) * K + k);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const acc_t xv = load_x8(x + m * K + k);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r][m] = fma8(xv, b[r], acc[r][m]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const int8_t* wr = w + (n + r) * K;
      for (int m = 0; m < M; ++m) {
        float total = sum8(acc[r][m]);
        for (int64_t k = K8; k < K; ++k) total += x[m * K + k] * wr[k];
        y[m * N + n + r] = total * scales[n + r];
      }
    }
  }
  if constexpr (R > 1) {
    if (n < n_end) int8_rows<M, 1>(x, w, scales, y, n, n_end, K, N);
  }
}

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scales) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && w.scalar_type() == at::kChar, "x [M, K], w int8 [N, K]");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K && scales.numel() == N, "shapes do not match");
  auto xf = x.to(at::kFloat).contiguous();
  auto wc = w.contiguous();
  auto sf = scales.to(at::kFloat).contiguous();
  auto y = torch::empty({M, N}, xf.options());
  const float* xp = xf.data_ptr<float>();
  const int8_t* wp = wc.data_ptr<int8_t>();
  const float* sp = sf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // chunks of 64 output channels per task
  at::parallel_for(0, (N + 63) / 64, 1, [&](int64_t begin, int64_t end) {
    const int64_t nb = begin * 64, ne = std::min(end * 64, N);
    for (int64_t m0 = 0; m0 < M; m0 += 8) {  // rows of x eight at a time (a pass over the weights each)
      const float* xm = xp + m0 * K;
      float* ym = yp + m0 * N;
      switch (std::min<int64_t>(M - m0, 8)) {
        case 1: int8_rows<1, 4>(xm, wp, sp, ym, nb, ne, K, N); break;
        case 2: int8_rows<2, 4>(xm, wp, sp, ym, nb, ne, K, N); break;
        case 3: int8_rows<3, 3>(xm, wp, sp, ym, nb, ne, K, N); break;
        case 4: int8_rows<4, 2>(xm, wp, sp, ym, nb, ne, K, N); break;
        case 5: int8_rows<5, 2>(xm, wp, sp, ym, nb, ne, K, N); break;
        case 6: int8_rows<6, 2>(xm, wp, sp, ym, nb, ne, K, N); break;
        case 7: int8_rows<7, 1>(xm, wp, sp, ym, nb, ne, K, N); break;
        default: int8_rows<8, 1>(xm, wp, sp, ym, nb, ne, K, N); break;
      }
    }
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// ---- int4 weight-only matrix product for few rows (decode) --------------------------------------
//
// Groups of GS inputs (a multiple of 32) share a scale and a minimum: w = q * scale + min, q in
// 0..15, stored as nibble pairs (low nibble = even input, high = odd). Per weight row and group:
// the code dot products with x's even and odd inputs (x split once per call), times the scale,
// accumulate in a vector; the minimums add sum_g min * sum(x over g) at the end. Same summation
// order for every M and thread split (a row's result does not depend on its batch).

template <int M>
void int4_rows(const float* xe, const float* xo, const float* xsum, const uint8_t* codes, const float* scale,
               const float* mins, float* y, int64_t n_begin, int64_t n_end, int64_t K, int64_t N, int64_t GS) {
  const int64_t G = K / GS, half = K / 2, gh = GS / 2;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* c = codes + n * half;
    acc_t total[M];
    for (int m = 0; m < M; ++m) total[m] = acc_zero();
    for (int64_t g = 0; g < G; ++g) {
      acc_t part[M];
      for (int m = 0; m < M; ++m) part[m] = acc_zero();
      for (int64_t j = g * gh; j < (g + 1) * gh; j += 16) {  // 16 bytes: 32 weights
        __builtin_prefetch(c + half + j);  // the next row's codes
#if defined(__AVX2__) && defined(__FMA__)
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + j));
        const __m128i mask = _mm_set1_epi8(0x0F);
        const __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
        const acc_t w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        const acc_t w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        const acc_t w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        const acc_t w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
#else
        acc_t w0, w1, w2, w3;
        for (int i = 0; i < 8; ++i) {
          w0[i] = c[j + i] & 15;
          w1[i] = c[j + 8 + i] & 15;
          w2[i] = c[j + i] >> 4;
          w3[i] = c[j + 8 + i] >> 4;
        }
#endif
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          const float* e = xe + m * half + j;
          const float* o = xo + m * half + j;
          part[m] = fma8(load_x8(e), w0, part[m]);
          part[m] = fma8(load_x8(e + 8), w1, part[m]);
          part[m] = fma8(load_x8(o), w2, part[m]);
          part[m] = fma8(load_x8(o + 8), w3, part[m]);
        }
      }
#if defined(__AVX2__) && defined(__FMA__)
      const acc_t sv = _mm256_set1_ps(scale[n * G + g]);
#else
      const float s1 = scale[n * G + g];
      const acc_t sv = {s1, s1, s1, s1, s1, s1, s1, s1};
#endif
      for (int m = 0; m < M; ++m) total[m] = fma8(part[m], sv, total[m]);
    }
    for (int m = 0; m < M; ++m) {
      float low = 0.f;
      for (int64_t g = 0; g < G; ++g) low += mins[n * G + g] * xsum[m * G + g];
      y[m * N + n] = sum8(total[m]) + low;
    }
  }
}

torch::Tensor int4_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, torch::Tensor mins,
                          int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && codes.dim() == 2 && codes.scalar_type() == at::kByte, "x [M, K], codes uint8 [N, K/2]");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  TORCH_CHECK(codes.size(1) * 2 == K && group_size % 32 == 0 && K % group_size == 0, "shapes do not match");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && mins.scalar_type() == at::kFloat, "scales and minimums in float32");
  auto xf = x.to(at::kFloat).contiguous();
  auto cc = codes.contiguous();
  auto sc = scale.contiguous(), mc = mins.contiguous();
  auto y = torch::empty({M, N}, xf.options());
  const int64_t half = K / 2, G = K / group_size;
  // x split into even and odd inputs, and its sum per group: once per call, plain loops (a few
  // small torch ops here cost more than the product itself at one row)
  std::vector<float> xe(M * half), xo(M * half), xsum(M * G, 0.f);
  const float* xp = xf.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < half; ++i) {
      const float a = xp[m * K + 2 * i], b = xp[m * K + 2 * i + 1];
      xe[m * half + i] = a;
      xo[m * half + i] = b;
      xsum[m * G + 2 * i / group_size] += a + b;
    }
  at::parallel_for(0, (N + 31) / 32, 1, [&](int64_t begin, int64_t end) {
    const int64_t nb = begin * 32, ne = std::min(end * 32, N);
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      const float* e = xe.data() + m0 * half;
      const float* o = xo.data() + m0 * half;
      const float* xs = xsum.data() + m0 * G;
      float* ym = y.data_ptr<float>() + m0 * N;
      const uint8_t* cp = cc.data_ptr<uint8_t>();
      const float* sp = sc.data_ptr<float>();
      const float* mp = mc.data_ptr<float>();
      switch (std::min<int64_t>(M - m0, 8)) {
        case 1: int4_rows<1>(e, o, xs, cp, sp, mp, ym, nb, ne, K, N, group_size); break;
        case 2: int4_rows<2>(e, o, xs, cp, sp, mp, ym, nb, ne, K, N, group_size); break;
        case 3: int4_rows<3>(e, o, xs, cp, sp, mp, ym, nb, ne, K, N, group_size); break;
        case 4: int4_rows<4>(e, o, xs, cp, sp, mp, ym, nb, ne, K, N, group_size); break;
        case 5: int4_rows<5>(e, o, xs, cp, sp, mp, ym, nb, ne, K, N, group_size); break;
        case 6: int4_rows<6>(e, o, xs, cp, sp, mp, ym, nb, ne, K, N, group_size); break;
        case 7: int4_rows<7>(e, o, xs, cp, sp, mp, ym, nb, ne, K, N, group_size); break;
        default: int4_rows<8>(e, o, xs, cp, sp, mp, ym, nb, ne, K, N, group_size); break;
      }
    }
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// ---- int8 activations for the int8 x int8 product (`--quantization w8a8`) ----------------------
//
// quantize_rows_int8: each row of x times the layer's smoothing factors (SmoothQuant: 1/s per
// input), then symmetric int8 with one scale per row: scale = max|r| / 127, q = round(r / scale)
// (to nearest even, as torch.round). A row's codes depend on that row alone.
// dequantize_int32: y[m, n] = acc[m, n] * row_scale[m] * col_scale[n] (+ bias[n]), in float32,
// rounded once to the output dtype. One pass over each, rows split over threads.

template <typename T, typename Q>
void quantize_rows_kernel(const T* xp, const float* sp, Q* qp, int64_t ldq, float* scp, int64_t M, int64_t K) {
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> r(K);
    for (int64_t m = begin; m < end; ++m) {
      const T* row = xp + m * K;
      float amax = 0.f;
#pragma omp simd reduction(max : amax)
      for (int64_t k = 0; k < K; ++k) {
        r[k] = to_float<T>(row[k]) * sp[k];
        amax = std::max(amax, std::fabs(r[k]));
      }
      const float scale = std::max(amax * (1.f / 127.f), 1e-12f);
      const float inv = 1.f / scale;
      Q* qr = qp + m * ldq;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) {
        const float v = std::nearbyint(r[k] * inv);
        qr[k] = static_cast<Q>(std::min(std::max(v, -127.f), 127.f));
      }
      scp[m] = scale;
    }
  });
}

// (acc * row) * column, then + bias, each rounded, in that order: as the PyTorch twin computes
// (fast-math would hoist row * column out of the loop and fuse the add)
#pragma GCC push_options
#pragma GCC optimize("no-associative-math", "fp-contract=off")
// (functions defined outside this region are not inlined into it: float32 output is written
// directly, so that the loops vectorize)
template <typename T>
void dequantize_row(const int32_t* a, float r, const float* cp, const float* bp, T* o, int64_t N) {
  if constexpr (std::is_same_v<T, float>) {
    if (bp == nullptr) {
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) o[n] = static_cast<float>(a[n]) * r * cp[n];
    } else {
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) o[n] = static_cast<float>(a[n]) * r * cp[n] + bp[n];
    }
  } else if (bp == nullptr) {
    for (int64_t n = 0; n < N; ++n) o[n] = from_float<T>(static_cast<float>(a[n]) * r * cp[n]);
  } else {
    for (int64_t n = 0; n < N; ++n) o[n] = from_float<T>(static_cast<float>(a[n]) * r * cp[n] + bp[n]);
  }
}
#pragma GCC pop_options

template <typename T>
void dequantize_kernel(const int32_t* ap, const float* rp, const float* cp, const float* bp, T* op, int64_t M,
                       int64_t N) {
  at::parallel_for(0, M, 8, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) dequantize_row<T>(ap + m * N, rp[m], cp, bp, op + m * N, N);
  });
}

// An optional bias [N] as a contiguous float32 tensor (undefined when there is none).
torch::Tensor float_bias(const c10::optional<torch::Tensor>& bias, int64_t N) {
  if (!bias.has_value() || !bias->defined()) return {};
  auto bf = bias->to(at::kFloat).contiguous();
  TORCH_CHECK(bf.numel() == N, "bias [N]");
  return bf;
}

std::tuple<torch::Tensor, torch::Tensor> quantize_rows_int8(torch::Tensor x, torch::Tensor inv_smooth) {
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(inv_smooth.scalar_type() == at::kFloat && inv_smooth.numel() == K, "inv_smooth float32 [K]");
  auto xc = x.contiguous();
  auto sc = inv_smooth.contiguous();
  auto q = torch::empty({M, K}, x.options().dtype(at::kChar));
  auto scales = torch::empty({M}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "quantize_rows_int8", [&] {
    quantize_rows_kernel<scalar_t, int8_t>(xc.data_ptr<scalar_t>(), sc.data_ptr<float>(), q.data_ptr<int8_t>(), K,
                                           scales.data_ptr<float>(), M, K);
  });
  return {q, scales};
}

torch::Tensor dequantize_int32(torch::Tensor acc, torch::Tensor row_scale, torch::Tensor col_scale,
                               c10::optional<torch::Tensor> bias, c10::ScalarType dtype) {
  TORCH_CHECK(acc.dim() == 2 && acc.scalar_type() == at::kInt, "acc must be int32 [M, N]");
  const int64_t M = acc.size(0), N = acc.size(1);
  TORCH_CHECK(row_scale.scalar_type() == at::kFloat && row_scale.numel() == M, "row scales float32 [M]");
  TORCH_CHECK(col_scale.scalar_type() == at::kFloat && col_scale.numel() == N, "column scales float32 [N]");
  auto ac = acc.contiguous();
  auto rs = row_scale.contiguous(), cs = col_scale.contiguous();
  const torch::Tensor bf = float_bias(bias, N);
  auto out = torch::empty({M, N}, acc.options().dtype(dtype));
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "dequantize_int32", [&] {
    dequantize_kernel<scalar_t>(ac.data_ptr<int32_t>(), rs.data_ptr<float>(), cs.data_ptr<float>(), bp,
                                out.data_ptr<scalar_t>(), M, N);
  });
  return out;
}

// ---- int8 x int8 matrix product on AVX2 (`--quantization w8a8` where VNNI is missing) ---------
//
// c[m, n] = sum_k a[m, k] * w[n, k], exact in int32, the same integers as torch._int_mm (whose
// CPU path without VNNI runs at ~2 GOP/s, 60x slower than a float32 GEMM on a 2-core AVX2 EPYC).
// AVX2 has no int8 dot product that takes two signed operands without saturating, so both sides
// are widened to int16 and vpmaddwd sums pairs of products (exact: |a|, |w| <= 127): 16 products
// per instruction. On that EPYC (Zen 3) vpmaddwd issues once per cycle, two FMAs do, so the
// arithmetic peak equals float32's (~200 GOP/s on 2 cores); this kernel reaches ~190 where
// oneDNN's float32 GEMM reached 120-170 in the same runs, and at few rows it reads a quarter of
// the bytes (M = 1, 576 x 1536: 30 us against 95-150 us).
//
// The weight is packed once, at load (ladle.model.quant.pack_int8_panels): panels of 16 output
// channels, and in a panel, for each pair of inputs (k, k+1), the 16 channels' two weights:
// [N/16][K/2][16][2] int8, zero-padded to whole panels and an even K. The activations arrive as
// int16 codes. A tile of MR rows x 16 channels keeps 2 * MR accumulators in registers; per input
// pair it loads the panel's 32 bytes (two vpmovsxbw), broadcasts each row's pair, and does 2 * MR
// vpmaddwd. Threads take runs of panels as they come free; rows go kRowChunk at a time so that a
// panel (16 * K bytes) stays in L1 while those rows' codes (kRowChunk * K * 2 bytes) stay in L2.

#if defined(__AVX2__) && defined(__FMA__)
inline __m256i pair_of(const int16_t* row, int64_t p) {
  int32_t pair;
  std::memcpy(&pair, row + 2 * p, sizeof(pair));
  return _mm256_set1_epi32(pair);
}

// one row's pair of inputs times the panel's 16 channels, into the row's two accumulators
inline void madd_row(__m256i x, __m256i w0, __m256i w1, __m256i& c0, __m256i& c1) {
  c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(x, w0));
  c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(x, w1));
}

inline void store_tile_row(int32_t* t, __m256i lo, __m256i hi) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(t), lo);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(t + 8), hi);
}

// MR rows x 16 channels into tile [MR][16], MR <= 4: 2 * MR accumulators, as named registers (GCC
// spills an array of them to the stack: 150 -> 190 GOP/s once written out)
template <int MR>
inline void int8_tile(const int16_t* a, int64_t lda, const int8_t* panel, int64_t pairs, int32_t* tile) {
  static_assert(MR >= 1 && MR <= 4, "four rows at most");
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
  const int16_t *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda;
  for (int64_t p = 0; p < pairs; ++p) {
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(panel + p * 32)));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(panel + p * 32 + 16)));
    madd_row(pair_of(a0, p), w0, w1, c00, c01);
    if constexpr (MR > 1) madd_row(pair_of(a1, p), w0, w1, c10, c11);
    if constexpr (MR > 2) madd_row(pair_of(a2, p), w0, w1, c20, c21);
    if constexpr (MR > 3) madd_row(pair_of(a3, p), w0, w1, c30, c31);
  }
  store_tile_row(tile, c00, c01);
  if constexpr (MR > 1) store_tile_row(tile + 16, c10, c11);
  if constexpr (MR > 2) store_tile_row(tile + 32, c20, c21);
  if constexpr (MR > 3) store_tile_row(tile + 48, c30, c31);
}
#else
template <int MR>
inline void int8_tile(const int16_t* a, int64_t lda, const int8_t* panel, int64_t pairs, int32_t* tile) {
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 16; ++j) {
      int32_t acc = 0;
      for (int64_t p = 0; p < pairs; ++p)
        acc += a[m * lda + 2 * p] * panel[p * 32 + 2 * j] + a[m * lda + 2 * p + 1] * panel[p * 32 + 2 * j + 1];
      tile[m * 16 + j] = acc;
    }
}
#endif

constexpr int64_t kPanel = 16;  // output channels per panel
constexpr int64_t kRowChunk = 96;  // rows of activations per pass over a thread's panels
constexpr int kRowTile = 4;  // 8 accumulators + 2 weight vectors + 1 broadcast: no spills in 16 ymm

struct Panels {  // a weight packed by ladle.model.quant.pack_int8_panels
  const int8_t* data;
  int64_t count, pairs;
};

Panels check_panels(const torch::Tensor& packed, int64_t K, int64_t N) {
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kChar && packed.size(2) == kPanel && packed.size(3) == 2,
              "packed must be int8 [N/16, K/2, 16, 2] (ladle.model.quant.pack_int8_panels)");
  TORCH_CHECK(packed.is_contiguous(), "packed must be contiguous");
  TORCH_CHECK(packed.size(1) == (K + 1) / 2 && packed.size(0) == (N + kPanel - 1) / kPanel, "shapes do not match");
  return {packed.data_ptr<int8_t>(), packed.size(0), packed.size(1)};
}

// a16: M rows of int16 codes, row stride 2 * pairs. Calls sink(m, rows, n0, cols, tile) for each
// tile of up to kRowTile rows x 16 channels (tile [rows][16] int32; cols <= 16 of them are real).
template <typename Sink>
void int8_panels(const int16_t* a16, int64_t M, const Panels& w, int64_t N, const Sink& sink) {
  const int64_t lda = w.pairs * 2;
  // items: (pass over kRowChunk rows, run of panels), pass-major, so that the threads sweep the
  // panels once per pass as with a fixed split, the pass's rows staying in L2. A run of panels is
  // an eighth of a thread's share but at least 64 row-panels of work (a few us), so that a one-row
  // decode is cut in halves as before: its products are too short to gain from finer cuts.
  const int64_t pass_rows = std::min(M, kRowChunk), threads = std::max(1, at::get_num_threads());
  const int64_t share = (w.count + threads - 1) / threads;
  const int64_t eighth = std::max<int64_t>(1, w.count / (8 * threads));
  const int64_t run = std::min(share, std::max(eighth, (64 + pass_rows - 1) / pass_rows));
  const int64_t runs = (w.count + run - 1) / run;
  const int64_t passes = (M + kRowChunk - 1) / kRowChunk;
  parallel_items(passes * runs, [&](int64_t item) {
    alignas(32) int32_t tile[kRowTile * kPanel];  // on the stack: a tile kept in the closure made
                                                  // one-row products 40% slower
    const int64_t m0 = (item / runs) * kRowChunk, m1 = std::min(m0 + kRowChunk, M);
    const int64_t begin = (item % runs) * run, end = std::min(begin + run, w.count);
    for (int64_t panel = begin; panel < end; ++panel) {
      const int8_t* pw = w.data + panel * w.pairs * kPanel * 2;
      const int64_t n0 = panel * kPanel, cols = std::min(kPanel, N - n0);
      for (int64_t m = m0; m < m1; m += kRowTile) {
        const int64_t rows = std::min<int64_t>(kRowTile, m1 - m);
        const int16_t* am = a16 + m * lda;
        switch (rows) {
          case 4: int8_tile<4>(am, lda, pw, w.pairs, tile); break;
          case 3: int8_tile<3>(am, lda, pw, w.pairs, tile); break;
          case 2: int8_tile<2>(am, lda, pw, w.pairs, tile); break;
          default: int8_tile<1>(am, lda, pw, w.pairs, tile); break;
        }
        sink(m, rows, n0, cols, tile);
      }
    }
  });
}

torch::Tensor int8_gemm(torch::Tensor a, torch::Tensor packed, int64_t N) {
  TORCH_CHECK(a.dim() == 2 && a.scalar_type() == at::kChar, "a must be int8 [M, K]");
  const int64_t M = a.size(0), K = a.size(1);
  const Panels w = check_panels(packed, K, N);
  const int64_t lda = w.pairs * 2;
  std::vector<int16_t> a16(M * lda, 0);  // widened to int16, padded to an even K
  auto ac = a.contiguous();
  const int8_t* ap = ac.data_ptr<int8_t>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) a16[m * lda + k] = ap[m * K + k];
  auto c = torch::empty({M, N}, a.options().dtype(at::kInt));
  int32_t* cp = c.data_ptr<int32_t>();
  int8_panels(a16.data(), M, w, N, [&](int64_t m, int64_t rows, int64_t n0, int64_t cols, const int32_t* tile) {
    for (int64_t r = 0; r < rows; ++r) std::memcpy(cp + (m + r) * N + n0, tile + r * kPanel, cols * sizeof(int32_t));
  });
  return c;
}

// The whole w8a8 layer on the panels: rows quantized straight to int16 codes (the same codes and
// scales as quantize_rows_int8), the product, and each tile dequantized while it is in L1 (the
// same arithmetic as dequantize_int32): no int8 or int32 matrix in memory, two parallel regions.
torch::Tensor w8a8_linear(torch::Tensor x, torch::Tensor inv_smooth, torch::Tensor packed, torch::Tensor w_scale,
                          c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = w_scale.numel();
  TORCH_CHECK(inv_smooth.scalar_type() == at::kFloat && inv_smooth.numel() == K, "inv_smooth float32 [K]");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat, "w_scale float32 [N]");
  const Panels w = check_panels(packed, K, N);
  const int64_t lda = w.pairs * 2;
  auto xc = x.contiguous();
  auto sm = inv_smooth.contiguous(), ws = w_scale.contiguous();
  const torch::Tensor bf = float_bias(bias, N);
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
  const float* cs = ws.data_ptr<float>();
  std::vector<int16_t> a16(M * lda, 0);
  std::vector<float> row_scale(M);
  auto out = torch::empty({M, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "w8a8_linear", [&] {
    quantize_rows_kernel<scalar_t, int16_t>(xc.data_ptr<scalar_t>(), sm.data_ptr<float>(), a16.data(), lda,
                                            row_scale.data(), M, K);
    scalar_t* op = out.data_ptr<scalar_t>();
    int8_panels(a16.data(), M, w, N, [&](int64_t m, int64_t rows, int64_t n0, int64_t cols, const int32_t* tile) {
      for (int64_t r = 0; r < rows; ++r)
        dequantize_row<scalar_t>(tile + r * kPanel, row_scale[m + r], cs + n0, bp == nullptr ? nullptr : bp + n0,
                                 op + (m + r) * N + n0, cols);
    });
  });
  return out;
}

// ---- a whole decode step in one call -------------------------------------------------------------
//
// At a few rows a decoder layer is ~10 small calls; made from Python each costs more than its work
// (at one token: ~6 ms of a 20 ms step on a 2-core EPYC, against ~12 ms of weight reads). The plan
// holds every layer's weights and KV cache and runs embedding, layers and final norm with the same
// kernels, in the same order, as the modules do (so the same numbers, bit for bit). A projection is
// one of the forms the modules take at few rows, each computed as its module computes it:
//   kDense   x W^T + b                               (nn.Linear: at::linear)
//   kW8A8    w8a8_linear on the panel layout          (W8A8Linear on CPUs without VNNI)
//   kW8A8Mm  quantize_rows_int8, _int_mm, dequantize   (W8A8Linear where _int_mm is fast)
//   kInt8    int8_linear, then + b                     (Int8Linear's few-rows path)
//   kPacked  oneDNN's linear on a reordered weight      (PackedLinear: mkldnn::_linear_pointwise),
//            with fewer than min_rows rows padded by zero rows to min_rows, as PackedLinear does
enum LinearKind : int64_t { kDense = 0, kW8A8 = 1, kW8A8Mm = 2, kInt8 = 3, kPacked = 4 };

torch::Tensor onednn_linear(const torch::Tensor& x, const torch::Tensor& packed, const c10::optional<torch::Tensor>& bias) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  c10::List<c10::optional<at::Scalar>> scalars;
  scalars.push_back(c10::nullopt);
  torch::jit::Stack stack{x, packed, bias.has_value() ? c10::IValue(*bias) : c10::IValue(), c10::IValue("none"),
                          c10::IValue(scalars), c10::IValue("")};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

struct PlanLinear {
  int64_t kind;
  // kDense: weight; kPacked: the reordered weight; kW8A8: packed, inv_smooth, w_scale;
  // kW8A8Mm: int8 [N, K] weight, inv_smooth, w_scale; kInt8: qweight, scales
  std::vector<torch::Tensor> t;
  c10::optional<torch::Tensor> bias;
  int64_t min_rows;  // kPacked: the fewest rows at which oneDNN's bits do not depend on the row count

  torch::Tensor packed(const torch::Tensor& x) const {
    const int64_t n = x.size(0);
    if (n >= min_rows) return onednn_linear(x, t[0], bias);
    auto padded = torch::zeros({min_rows, x.size(1)}, x.options());
    padded.narrow(0, 0, n).copy_(x);
    return onednn_linear(padded, t[0], bias).narrow(0, 0, n);
  }

  torch::Tensor operator()(const torch::Tensor& x) const {
    switch (kind) {
      case kDense: return at::linear(x, t[0], bias);
      case kW8A8: return w8a8_linear(x, t[1], t[0], t[2], bias);
      case kPacked: return packed(x);
      case kW8A8Mm: {
        auto [q, row_scale] = quantize_rows_int8(x, t[1]);
        return dequantize_int32(at::_int_mm(q, t[0].t()), row_scale, t[2], bias, x.scalar_type());
      }
      case kInt8: {
        auto out = int8_linear(x, t[0], t[1]);
        if (bias.has_value() && bias->defined()) out.add_(*bias);
        return out;
      }
    }
    TORCH_CHECK(false, "unknown projection form");
  }
};

PlanLinear plan_linear(int64_t kind, std::vector<torch::Tensor> tensors, c10::optional<torch::Tensor> bias,
                       int64_t min_rows) {
  const size_t want = kind == kDense || kind == kPacked ? 1 : kind == kInt8 ? 2 : 3;
  TORCH_CHECK(kind >= kDense && kind <= kPacked && tensors.size() == want, "unknown projection form or tensors");
  TORCH_CHECK(min_rows >= 1, "min_rows must be at least 1");
  return {kind, std::move(tensors), std::move(bias), min_rows};
}

struct PlanLayer {
  torch::Tensor norm1, norm2, k_cache, v_cache;
  double eps1, eps2;
  PlanLinear qkv, o, gate_up, down;
};

class DecodePlan {
 public:
  DecodePlan(torch::Tensor embed, torch::Tensor norm, double eps, torch::Tensor cos_sin, int64_t num_heads,
             int64_t num_kv_heads, int64_t head_dim, double scale)
      : embed_(embed), norm_(norm), cos_sin_(cos_sin), eps_(eps), scale_(scale), hq_(num_heads),
        hkv_(num_kv_heads), d_(head_dim) {}

  using LinearSpec = std::tuple<int64_t, std::vector<torch::Tensor>, c10::optional<torch::Tensor>, int64_t>;

  void add_layer(torch::Tensor norm1, double eps1, torch::Tensor norm2, double eps2, torch::Tensor k_cache,
                 torch::Tensor v_cache, LinearSpec qkv, LinearSpec o, LinearSpec gate_up, LinearSpec down) {
    auto lin = [](LinearSpec& s) {
      return plan_linear(std::get<0>(s), std::get<1>(s), std::get<2>(s), std::get<3>(s));
    };
    TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(0) == hkv_ && k_cache.size(3) == d_, "cache [Hkv, NB, BS, D]");
    layers_.push_back({norm1, norm2, k_cache, v_cache, eps1, eps2, lin(qkv), lin(o), lin(gate_up), lin(down)});
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // input_ids, positions, slots [T] int64; block_tables [T, max_blocks], context_lens [T]: one
  // decode per row. Returns the final-normed hidden states [T, hidden].
  torch::Tensor run(torch::Tensor input_ids, torch::Tensor positions, torch::Tensor slots, torch::Tensor block_tables,
                    torch::Tensor context_lens) const {
    const int64_t T = input_ids.size(0), q_size = hq_ * d_, kv_size = hkv_ * d_;
    TORCH_CHECK(block_tables.size(0) == T && context_lens.numel() == T, "one decode per row");
    torch::Tensor x = at::embedding(embed_, input_ids), residual;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const PlanLayer& l = layers_[i];
      torch::Tensor h;
      if (i == 0) {
        residual = x;
        h = rms_norm(x, l.norm1, l.eps1);
      } else {
        h = add_rms_norm(x, residual, l.norm1, l.eps1);
      }
      auto qkv = l.qkv(h);
      rotary_inplace(qkv, positions, cos_sin_, hq_, hkv_, d_);
      auto q = qkv.narrow(1, 0, q_size).view({T, hq_, d_});
      auto k = qkv.narrow(1, q_size, kv_size).view({T, hkv_, d_});
      auto v = qkv.narrow(1, q_size + kv_size, kv_size).view({T, hkv_, d_});
      write_kv_slots(l.k_cache, l.v_cache, k, v, slots);
      auto attn = paged_decode_attention(q.contiguous(), l.k_cache, l.v_cache, block_tables, context_lens, scale_);
      h = add_rms_norm(l.o(attn.view({T, q_size})), residual, l.norm2, l.eps2);
      x = l.down(silu_and_mul(l.gate_up(h)));
    }
    return add_rms_norm(x, residual, norm_, eps_);
  }

 private:
  torch::Tensor embed_, norm_, cos_sin_;
  double eps_, scale_;
  int64_t hq_, hkv_, d_;
  std::vector<PlanLayer> layers_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache (CPU)");
  m.def("write_kv_slots", &write_kv_slots, "k and v of a step into their cache slots");
  m.def("rms_norm", &rms_norm, "RMSNorm of each row");
  m.def("add_rms_norm", &add_rms_norm, "residual += x in place, then RMSNorm of residual");
  m.def("rotary_inplace", &rotary_inplace, "rotate q and k of the fused qkv output in place");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up");
  m.def("int8_linear", &int8_linear, "x @ (int8 w * scale)^T for few rows");
  m.def("quantize_rows_int8", &quantize_rows_int8, "rows times 1/smoothing, as int8 with a scale per row");
  m.def("dequantize_int32", &dequantize_int32, "int32 products times row and column scales (+ bias)");
  m.def("int8_gemm", &int8_gemm, "int8 [M, K] x packed int8 weight -> int32 [M, N], exact (AVX2)");
  m.def("w8a8_linear", &w8a8_linear, "a w8a8 layer on a packed int8 weight: quantize, product, dequantize");
  m.def("int4_linear", &int4_linear, "x @ (int4 w * scale + min)^T, groups of a multiple of 32, few rows");
  py::class_<DecodePlan>(m, "DecodePlan", "a decode step's layers in one call (ladle.model.decode_plan)")
      .def(py::init<torch::Tensor, torch::Tensor, double, torch::Tensor, int64_t, int64_t, int64_t, double>())
      .def("add_layer", &DecodePlan::add_layer)
      .def("run", &DecodePlan::run, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("num_layers", &DecodePlan::num_layers);
}
