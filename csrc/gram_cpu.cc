// CPU Gram matrix of stacked per-task gradients, as an XLA FFI custom call.
//
// K = X X^T for a row-major (T, n) float32 or bfloat16 matrix X (one row per
// task), returned as a (T, T) float32 matrix. XLA:CPU runs the equivalent
// `dot_general` far from memory bandwidth when T is small and n is huge (the
// matmul kernels vectorise over T); this kernel vectorises over n instead:
//
//  * the columns are cut into at most kMaxParts equal parts (a function of
//    the shape only, so the result does not depend on the thread count);
//    the parts run on XLA's intra-op thread pool and the calling thread;
//  * inside a part, chunks of kChunk columns are visited once; for every
//    4 x 4 tile of the upper triangle of K, 16 vector accumulators (float32,
//    kLanes lanes) are updated from 8 row loads per kLanes columns, so each
//    element of X is read from memory once and from L1/L2 a few times;
//  * every chunk's float32 partial sums are added to float64 accumulators,
//    and the parts are summed in float64 in a fixed order.
//
// Loaded with ctypes and registered with jax.ffi by gradcraft_jax/_cpu_gram.py.
//
// Every kernel keeps IEEE semantics: the finiteness probes rely on x * 0
// being NaN for NaN and Inf, which -ffast-math / -ffinite-math-only would
// let the compiler fold to 0. Such a build is refused here, and the
// self-test on first use (_cpu_gram.py) feeds NaN and Inf as well.

#if defined(__FAST_MATH__) || (defined(__FINITE_MATH_ONLY__) && __FINITE_MATH_ONLY__)
#error "gram_cpu.cc needs IEEE NaN/Inf semantics: do not compile it with -ffast-math, -Ofast or -ffinite-math-only"
#endif

// The jaxlib version whose FFI headers this file is compiled against
// (setup.py defines it); the Python side refuses the library under another
// jaxlib version.
#ifndef GRADCRAFT_JAX_JAXLIB_VERSION
#error "define GRADCRAFT_JAX_JAXLIB_VERSION, the version of the jaxlib whose headers are used (setup.py does)"
#endif

#include <algorithm>
#include <cmath>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// "jaxlib=<version>": read by _cpu_gram.py before anything is registered.
extern "C" __attribute__((visibility("default"))) const char* GradcraftBuildInfo() {
  return "jaxlib=" GRADCRAFT_JAX_JAXLIB_VERSION;
}

namespace {

// An InvalidArgument error naming the kernel and the mismatch: the Python
// wrappers check shapes and dtypes first, so this only guards direct calls.
ffi::Error BadArgs(const char* kernel, const std::string& what) {
  return ffi::Error::InvalidArgument(std::string("gradcraft_jax ") + kernel + ": " + what);
}

std::string Count(const char* name, size_t got, int64_t want) {
  return std::string(name) + " has " + std::to_string(got) + " elements, expected " +
         std::to_string(want);
}

constexpr int64_t kLanes = 16;
constexpr int64_t kChunk = 512;           // columns per float32 partial sum
constexpr int64_t kMaxParts = 64;         // column parts (pool jobs) per call
constexpr int64_t kPartElems = 1 << 20;   // elements per part, at least

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GC_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GC_MULTIVERSION
#endif
#define GC_INLINE __attribute__((always_inline)) inline

GC_INLINE Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}

// out[r * t + c] += <a_r, b_c> over `len` columns (len % kLanes == 0) for an
// RI x RJ tile; rows of a and b are `ld` floats apart.
template <int RI, int RJ>
GC_INLINE void Tile(const float* a, const float* b, int64_t ld, int64_t len,
                    double* out, int64_t t) {
  Vec acc[RI][RJ];
  for (int r = 0; r < RI; ++r)
    for (int c = 0; c < RJ; ++c) acc[r][c] = Vec{};
  for (int64_t k = 0; k < len; k += kLanes) {
    Vec va[RI], vb[RJ];
    for (int r = 0; r < RI; ++r) va[r] = Load(a + r * ld + k);
    for (int c = 0; c < RJ; ++c) vb[c] = Load(b + c * ld + k);
    for (int r = 0; r < RI; ++r)
      for (int c = 0; c < RJ; ++c) acc[r][c] += va[r] * vb[c];
  }
  for (int r = 0; r < RI; ++r)
    for (int c = 0; c < RJ; ++c) {
      double s = 0.0;
      for (int l = 0; l < kLanes; ++l) s += acc[r][c][l];
      out[r * t + c] += s;
    }
}

template <int RI>
GC_INLINE void TileRow(int rj, const float* a, const float* b, int64_t ld,
                       int64_t len, double* out, int64_t t) {
  switch (rj) {
    case 1: Tile<RI, 1>(a, b, ld, len, out, t); break;
    case 2: Tile<RI, 2>(a, b, ld, len, out, t); break;
    case 3: Tile<RI, 3>(a, b, ld, len, out, t); break;
    default: Tile<RI, 4>(a, b, ld, len, out, t); break;
  }
}

// Adds the upper triangle of the Gram matrix of a (t, len) block (rows `ld`
// floats apart) to out (t x t, float64).
GC_MULTIVERSION
void BlockGram(const float* x, int64_t ld, int64_t t, int64_t len,
               double* out) {
  const int64_t body = len - len % kLanes;
  if (body > 0) {
    for (int64_t i = 0; i < t; i += 4) {
      const int ri = static_cast<int>(std::min<int64_t>(4, t - i));
      for (int64_t j = i; j < t; j += 4) {
        const int rj = static_cast<int>(std::min<int64_t>(4, t - j));
        const float* a = x + i * ld;
        const float* b = x + j * ld;
        double* o = out + i * t + j;
        switch (ri) {
          case 1: TileRow<1>(rj, a, b, ld, body, o, t); break;
          case 2: TileRow<2>(rj, a, b, ld, body, o, t); break;
          case 3: TileRow<3>(rj, a, b, ld, body, o, t); break;
          default: TileRow<4>(rj, a, b, ld, body, o, t); break;
        }
      }
    }
  }
  for (int64_t i = 0; i < t; ++i)
    for (int64_t j = i; j < t; ++j) {
      double s = 0.0;
      for (int64_t k = body; k < len; ++k)
        s += static_cast<double>(x[i * ld + k]) * x[j * ld + k];
      out[i * t + j] += s;
    }
}

GC_MULTIVERSION
void WidenBf16(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t bits = static_cast<uint32_t>(src[k]) << 16;
    std::memcpy(dst + k, &bits, sizeof(float));
  }
}

// Upper triangle of the Gram matrix of columns [c0, c1) into out (zeroed).
template <typename In>
void PartGram(const In* x, int64_t t, int64_t n, int64_t c0, int64_t c1,
              double* out, std::vector<float>* buf) {
  std::fill(out, out + t * t, 0.0);
  for (int64_t s = c0; s < c1; s += kChunk) {
    const int64_t len = std::min(kChunk, c1 - s);
    if constexpr (std::is_same_v<In, float>) {
      BlockGram(x + s, n, t, len, out);
    } else {
      buf->resize(t * kChunk);
      for (int64_t i = 0; i < t; ++i)
        WidenBf16(x + i * n + s, len, buf->data() + i * kChunk);
      BlockGram(buf->data(), kChunk, t, len, out);
    }
  }
}

// Runs fn(p) for p in [0, parts) on XLA's intra-op thread pool and the
// calling thread, and returns when every part is done. Helpers and the
// caller take parts from one counter; a helper that starts late finds none
// left (`shared` outlives it). The caller sleeps on a condition variable (no
// spinning) until the helpers finish the parts they hold; the mutex orders
// their writes before the caller's reads. No deadlock: the caller never
// waits for a part nobody has started.
template <typename F>
void RunParts(ffi::ThreadPool& pool, int64_t parts, F fn) {
  struct Shared {
    std::atomic<int64_t> next{0};
    std::mutex mu;  // guards `done`
    std::condition_variable all_done;
    int64_t done = 0;
  };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, parts, fn]() {
    for (;;) {
      const int64_t p = shared->next.fetch_add(1);
      if (p >= parts) return;
      fn(p);
      bool last;
      {
        std::lock_guard<std::mutex> lock(shared->mu);
        last = ++shared->done == parts;
      }
      if (last) shared->all_done.notify_one();
    }
  };
  const int64_t helpers =
      parts > 1 ? std::min<int64_t>(pool.num_threads(), parts - 1) : 0;
  for (int64_t h = 0; h < helpers; ++h) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->all_done.wait(lock, [&shared, parts] { return shared->done == parts; });
}

// Columns per part for a pass over a (t, n) matrix: parts are a function of
// the shape only (results never depend on the thread count).
int64_t PartWidth(int64_t t, int64_t n, int64_t part_elems, int64_t chunk,
                  int64_t* parts_out) {
  int64_t parts = std::clamp<int64_t>((t * n) / part_elems, 1, kMaxParts);
  int64_t width = (n + parts - 1) / parts;
  width = std::max<int64_t>(chunk, (width + chunk - 1) / chunk * chunk);
  *parts_out = std::max<int64_t>(1, (n + width - 1) / width);
  return width;
}

template <typename In>
ffi::Error Gram(ffi::ThreadPool pool, const In* x, int64_t t, int64_t n,
                float* out) {
  if (t == 0) return ffi::Error::Success();
  // Parts depend on the shape only: the float64 sum below has a fixed order.
  int64_t parts;
  const int64_t width = PartWidth(t, n, kPartElems, kChunk, &parts);

  std::vector<double> partial(parts * t * t, 0.0);
  double* part_sums = partial.data();
  RunParts(pool, parts, [=](int64_t p) {
    std::vector<float> buf;
    const int64_t c0 = p * width, c1 = std::min(n, c0 + width);
    PartGram(x, t, n, c0, c1, part_sums + p * t * t, &buf);
  });
  for (int64_t i = 0; i < t; ++i)
    for (int64_t j = i; j < t; ++j) {
      double s = 0.0;
      for (int64_t p = 0; p < parts; ++p) s += partial[p * t * t + i * t + j];
      out[i * t + j] = out[j * t + i] = static_cast<float>(s);
    }
  return ffi::Error::Success();
}

using F32Matrix = ffi::Buffer<ffi::F32, 2>;
using Bf16Matrix = ffi::Buffer<ffi::BF16, 2>;

ffi::Error GramF32(ffi::ThreadPool pool, F32Matrix x,
                   ffi::Result<F32Matrix> out) {
  const auto d = x.dimensions();
  if (out->element_count() != static_cast<size_t>(d[0] * d[0]))
    return BadArgs("gram", Count("out", out->element_count(), d[0] * d[0]));
  return Gram<float>(pool, x.typed_data(), d[0], d[1], out->typed_data());
}

ffi::Error GramBf16(ffi::ThreadPool pool, Bf16Matrix x,
                    ffi::Result<F32Matrix> out) {
  const auto d = x.dimensions();
  if (out->element_count() != static_cast<size_t>(d[0] * d[0]))
    return BadArgs("gram", Count("out", out->element_count(), d[0] * d[0]));
  return Gram<uint16_t>(pool, static_cast<const uint16_t*>(x.untyped_data()),
                        d[0], d[1], out->typed_data());
}


// ---------------------------------------------------------------- weighted sum
// out[k] = sum_i w[i] * x[i, k] for a row-major (T, n) float32 matrix (and a
// (1,) probe: 0 when every out[k] is finite, else NaN), the
// sum over i in order (as XLA's unrolled fusion), in float32. The columns are
// cut into parts by shape only and the parts run on XLA's intra-op thread
// pool and the calling thread, so the pass over x uses every core (XLA:CPU
// runs the fused loop on one).

constexpr int64_t kSumChunk = 2048;     // columns per L1-resident output chunk
constexpr int64_t kSumPartElems = 1 << 18;

// Returns sum_k out[k] * 0 over the part: 0 when every output is finite,
// NaN otherwise (inf * 0 and NaN * 0 are NaN), for free while the chunk is
// in L1: the caller's finiteness check needs no second pass over the output.
GC_MULTIVERSION
float PartSum(const float* x, const float* w, int64_t t, int64_t n, int64_t c0,
              int64_t c1, float* out) {
  Vec probe = Vec{};
  float tail = 0.0f;
  for (int64_t s = c0; s < c1; s += kSumChunk) {
    const int64_t len = std::min(kSumChunk, c1 - s);
    float* o = out + s;
    const float* x0 = x + s;
    const float w0 = w[0];
    for (int64_t k = 0; k < len; ++k) o[k] = w0 * x0[k];
    int64_t i = 1;
    for (; i + 4 <= t; i += 4) {  // four rows per pass over the output chunk
      const float* xa = x + i * n + s;
      const float* xb = xa + n;
      const float* xc = xb + n;
      const float* xd = xc + n;
      const float wa = w[i], wb = w[i + 1], wc = w[i + 2], wd = w[i + 3];
      for (int64_t k = 0; k < len; ++k)
        o[k] = (((o[k] + wa * xa[k]) + wb * xb[k]) + wc * xc[k]) + wd * xd[k];
    }
    for (; i < t; ++i) {
      const float* xi = x + i * n + s;
      const float wi = w[i];
      for (int64_t k = 0; k < len; ++k) o[k] += wi * xi[k];
    }
    const int64_t body = len - len % kLanes;
    for (int64_t k = 0; k < body; k += kLanes) probe += Load(o + k) * 0.0f;
    for (int64_t k = body; k < len; ++k) tail += o[k] * 0.0f;
  }
  for (int l = 0; l < kLanes; ++l) tail += probe[l];
  return tail;
}

ffi::Error WeightedSum(ffi::ThreadPool pool, const float* x, const float* w,
                       int64_t t, int64_t n, float* out, float* finite_probe) {
  *finite_probe = 0.0f;
  if (n == 0) return ffi::Error::Success();
  if (t == 0) {
    std::fill(out, out + n, 0.0f);
    return ffi::Error::Success();
  }
  int64_t parts;
  const int64_t width = PartWidth(t, n, kSumPartElems, kSumChunk, &parts);

  std::vector<float> probes(parts, 0.0f);
  float* part_probes = probes.data();
  RunParts(pool, parts, [=](int64_t p) {
    const int64_t c0 = p * width, c1 = std::min(n, c0 + width);
    part_probes[p] = PartSum(x, w, t, n, c0, c1, out);
  });
  for (int64_t p = 0; p < parts; ++p) *finite_probe += probes[p];
  return ffi::Error::Success();
}

using F32Vector = ffi::Buffer<ffi::F32, 1>;

ffi::Error WeightedSumF32(ffi::ThreadPool pool, F32Matrix x, F32Vector w,
                          ffi::Result<F32Vector> out,
                          ffi::Result<F32Vector> probe) {
  const auto d = x.dimensions();
  if (w.element_count() != static_cast<size_t>(d[0]))
    return BadArgs("weighted_sum", Count("w", w.element_count(), d[0]));
  if (out->element_count() != static_cast<size_t>(d[1]))
    return BadArgs("weighted_sum", Count("out", out->element_count(), d[1]));
  if (probe->element_count() != 1)
    return BadArgs("weighted_sum", Count("probe", probe->element_count(), 1));
  return WeightedSum(pool, x.typed_data(), w.typed_data(), d[0], d[1],
                     out->typed_data(), probe->typed_data());
}


// ---------------------------------------------------------------- GradDrop
// GradDrop's combination (Chen et al., NeurIPS 2020, Algorithm 1) of a
// row-major (T, n) float32 matrix with thresholds u (n,) and leaks (T,):
// per column k, purity P = (1 + sum_i x_ik / sum_i |x_ik|) / 2 (1/2 where
// every x_ik is 0), mask_ik = [P > u_k][x_ik > 0] + [P < u_k][x_ik < 0], and
// out_k = sum_i (leak_i + (1 - leak_i) mask_ik) x_ik, every sum over i in
// order in float32 (as the library's fused XLA chain). Columns are visited
// in L1/L2-sized chunks, so x is read from memory once; the (1,) probe is 0
// when every x is finite and NaN otherwise (x * 0, from the same pass).

constexpr int64_t kDropChunk = 256;

GC_MULTIVERSION
float PartDrop(const float* x, const float* u, const float* leak, int64_t t,
               int64_t n, int64_t c0, int64_t c1, float* out) {
  float total[kDropChunk], mass[kDropChunk], probe[kDropChunk];
  float up[kDropChunk], down[kDropChunk];
  for (int64_t k = 0; k < kDropChunk; ++k) probe[k] = 0.0f;
  for (int64_t s = c0; s < c1; s += kDropChunk) {
    const int64_t len = std::min(kDropChunk, c1 - s);
    const float* x0 = x + s;
    for (int64_t k = 0; k < len; ++k) {
      total[k] = x0[k];
      mass[k] = std::fabs(x0[k]);
      probe[k] += x0[k] * 0.0f;
    }
    for (int64_t i = 1; i < t; ++i) {
      const float* xi = x + i * n + s;
      for (int64_t k = 0; k < len; ++k) {
        total[k] += xi[k];
        mass[k] += std::fabs(xi[k]);
        probe[k] += xi[k] * 0.0f;
      }
    }
    const float* us = u + s;
    for (int64_t k = 0; k < len; ++k) {
      const bool pos = mass[k] > 0.0f;
      const float ratio = pos ? total[k] / (pos ? mass[k] : 1.0f) : 0.0f;
      const float p = 0.5f * (1.0f + ratio);
      up[k] = p > us[k] ? 1.0f : 0.0f;
      down[k] = p < us[k] ? 1.0f : 0.0f;
    }
    float* o = out + s;
    for (int64_t i = 0; i < t; ++i) {
      const float* xi = x + i * n + s;
      const float li = leak[i], lc = 1.0f - leak[i];
      for (int64_t k = 0; k < len; ++k) {
        const float g = xi[k];
        const float m = g > 0.0f ? up[k] : (g < 0.0f ? down[k] : 0.0f);
        const float kept = (li + lc * m) * g;
        o[k] = i == 0 ? kept : o[k] + kept;
      }
    }
  }
  float sum = 0.0f;
  for (int64_t k = 0; k < kDropChunk; ++k) sum += probe[k];
  return sum;
}

ffi::Error GradDropF32(ffi::ThreadPool pool, F32Matrix x, F32Vector u,
                       F32Vector leak, ffi::Result<F32Vector> out,
                       ffi::Result<F32Vector> probe) {
  const auto d = x.dimensions();
  const int64_t t = d[0], n = d[1];
  if (u.element_count() != static_cast<size_t>(n))
    return BadArgs("graddrop", Count("u", u.element_count(), n));
  if (leak.element_count() != static_cast<size_t>(t))
    return BadArgs("graddrop", Count("leak", leak.element_count(), t));
  if (out->element_count() != static_cast<size_t>(n))
    return BadArgs("graddrop", Count("out", out->element_count(), n));
  if (probe->element_count() != 1)
    return BadArgs("graddrop", Count("probe", probe->element_count(), 1));
  float* o = out->typed_data();
  float* pr = probe->typed_data();
  *pr = 0.0f;
  if (n == 0) return ffi::Error::Success();
  if (t == 0) {
    std::fill(o, o + n, 0.0f);
    return ffi::Error::Success();
  }
  int64_t parts;
  const int64_t width = PartWidth(t, n, kSumPartElems, kDropChunk, &parts);
  std::vector<float> probes(parts, 0.0f);
  float* part_probes = probes.data();
  const float *xs = x.typed_data(), *us = u.typed_data(), *ls = leak.typed_data();
  RunParts(pool, parts, [=](int64_t p) {
    const int64_t c0 = p * width, c1 = std::min(n, c0 + width);
    part_probes[p] = PartDrop(xs, us, ls, t, n, c0, c1, o);
  });
  for (int64_t p = 0; p < parts; ++p) *pr += probes[p];
  return ffi::Error::Success();
}

// ---------------------------------------------------------------- ExcessMTL
// One pass of ExcessMTL (He et al., ICML 2024, Equations 6-7) over row-major
// (T, n) float32 gradients g and running squared sums s: s_new = s + g^2 and
// excess_i = sum_k g_ik^2 / sqrt(s_new_ik + 1e-7) (float32 terms, chunk sums
// accumulated in float64 in a fixed order), and the (1,) finiteness probe of
// g. s_new never overwrites s (a non-finite g must leave the caller able to
// keep s: see KeepIfFinite).

constexpr int64_t kExcessChunk = 1024;

GC_MULTIVERSION
float PartExcess(const float* g, const float* s, int64_t t, int64_t n,
                 int64_t c0, int64_t c1, float* s_new, double* excess) {
  float term[kExcessChunk];
  Vec probe = Vec{};
  float probe_tail = 0.0f;
  for (int64_t i = 0; i < t; ++i) {
    double acc = 0.0;
    for (int64_t c = c0; c < c1; c += kExcessChunk) {
      const int64_t len = std::min(kExcessChunk, c1 - c);
      const float* gi = g + i * n + c;
      const float* si = s + i * n + c;
      float* oi = s_new + i * n + c;
      for (int64_t k = 0; k < len; ++k) {
        const float sq = gi[k] * gi[k];
        const float sn = si[k] + sq;
        oi[k] = sn;
        term[k] = sq / std::sqrt(sn + 1e-7f);
      }
      const int64_t body = len - len % kLanes;
      Vec lanes = Vec{};
      for (int64_t k = 0; k < body; k += kLanes) {
        lanes += Load(term + k);
        probe += Load(gi + k) * 0.0f;
      }
      float part = 0.0f;
      for (int l = 0; l < kLanes; ++l) part += lanes[l];
      for (int64_t k = body; k < len; ++k) {
        part += term[k];
        probe_tail += gi[k] * 0.0f;
      }
      acc += part;
    }
    excess[i] = acc;
  }
  for (int l = 0; l < kLanes; ++l) probe_tail += probe[l];
  return probe_tail;
}

ffi::Error ExcessF32(ffi::ThreadPool pool, F32Matrix g, F32Matrix s,
                     ffi::Result<F32Matrix> s_new, ffi::Result<F32Vector> excess,
                     ffi::Result<F32Vector> probe) {
  const auto d = g.dimensions();
  const int64_t t = d[0], n = d[1];
  const auto ds = s.dimensions();
  if (ds[0] != t || ds[1] != n)
    return BadArgs("excess_pass", "s is (" + std::to_string(ds[0]) + ", " +
                                      std::to_string(ds[1]) + "), g is (" +
                                      std::to_string(t) + ", " + std::to_string(n) + ")");
  if (s_new->element_count() != static_cast<size_t>(t * n))
    return BadArgs("excess_pass", Count("s_new", s_new->element_count(), t * n));
  if (excess->element_count() != static_cast<size_t>(t))
    return BadArgs("excess_pass", Count("excess", excess->element_count(), t));
  if (probe->element_count() != 1)
    return BadArgs("excess_pass", Count("probe", probe->element_count(), 1));
  float* ex = excess->typed_data();
  float* pr = probe->typed_data();
  *pr = 0.0f;
  std::fill(ex, ex + t, 0.0f);
  if (n == 0 || t == 0) return ffi::Error::Success();
  int64_t parts;
  const int64_t width = PartWidth(t, n, kSumPartElems, kExcessChunk, &parts);
  std::vector<double> partial(parts * t, 0.0);
  std::vector<float> probes(parts, 0.0f);
  double* part_excess = partial.data();
  float* part_probes = probes.data();
  const float *gs = g.typed_data(), *ss = s.typed_data();
  float* os = s_new->typed_data();
  RunParts(pool, parts, [=](int64_t p) {
    const int64_t c0 = p * width, c1 = std::min(n, c0 + width);
    part_probes[p] = PartExcess(gs, ss, t, n, c0, c1, os, part_excess + p * t);
  });
  for (int64_t i = 0; i < t; ++i) {
    double sum = 0.0;
    for (int64_t p = 0; p < parts; ++p) sum += partial[p * t + i];
    ex[i] = static_cast<float>(sum);
  }
  for (int64_t p = 0; p < parts; ++p) *pr += probes[p];
  return ffi::Error::Success();
}

// out = keep ? new : old, where out aliases `new` (input_output_aliases): no
// work at all when keep is true, one copy of `old` otherwise. The three
// buffers must have one dtype and one element count (checked: the copy is
// by bytes).
using PredScalar = ffi::Buffer<ffi::PRED, 0>;

ffi::Error KeepIfFinite(ffi::AnyBuffer new_value, ffi::AnyBuffer old_value,
                        PredScalar keep,
                        ffi::Result<ffi::AnyBuffer> out) {
  if (old_value.element_type() != new_value.element_type() ||
      out->element_type() != new_value.element_type())
    return BadArgs("keep_if", "new, old and out have different dtypes");
  if (old_value.element_count() != new_value.element_count() ||
      out->element_count() != new_value.element_count())
    return BadArgs("keep_if", Count("old", old_value.element_count(),
                                    static_cast<int64_t>(new_value.element_count())) +
                                  " (new), out has " +
                                  std::to_string(out->element_count()));
  void* dst = out->untyped_data();
  if (*keep.typed_data()) {
    if (dst != new_value.untyped_data())
      std::memcpy(dst, new_value.untyped_data(), new_value.size_bytes());
  } else {
    std::memcpy(dst, old_value.untyped_data(), old_value.size_bytes());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GradcraftGramF32, GramF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Matrix>()
                                  .Ret<F32Matrix>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GradcraftGramBf16, GramBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Bf16Matrix>()
                                  .Ret<F32Matrix>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GradcraftWeightedSumF32, WeightedSumF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Matrix>()
                                  .Arg<F32Vector>()
                                  .Ret<F32Vector>()
                                  .Ret<F32Vector>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GradcraftGradDropF32, GradDropF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Matrix>()
                                  .Arg<F32Vector>()
                                  .Arg<F32Vector>()
                                  .Ret<F32Vector>()
                                  .Ret<F32Vector>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GradcraftExcessF32, ExcessF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Matrix>()
                                  .Arg<F32Matrix>()
                                  .Ret<F32Matrix>()
                                  .Ret<F32Vector>()
                                  .Ret<F32Vector>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GradcraftKeepIfFinite, KeepIfFinite,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<PredScalar>()
                                  .Ret<ffi::AnyBuffer>());
